"""Benchmark tasks: each yields :class:`~capkv.tasks.base.Example` objects and scores predictions."""

from capkv.tasks.base import Example, Task

__all__ = ["Example", "Task"]
