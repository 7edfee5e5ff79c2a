"""Benchmark tasks: each yields :class:`~capkv.tasks.base.Example` objects, scores predictions and
says how its scores are reported (:class:`~capkv.tasks.base.Reporting`).

One home per benchmark: :mod:`~capkv.tasks.needle`, :mod:`~capkv.tasks.longbench` and
:mod:`~capkv.tasks.ruler`; what they share is in :mod:`~capkv.tasks.common` and
:mod:`~capkv.tasks.haystack`. Each is built from ``conf/task/<name>.yaml`` (``_target_``).
"""

from capkv.tasks.base import Example, Reporting, Task

__all__ = ["Example", "Reporting", "Task"]
