"""Baselines on CapKV's interface: each a small :class:`capkv.engine.method.EvictionMethod`."""

from baselines.full import Full
from baselines.h2o import H2O
from baselines.pyramidkv import PyramidKV, pyramid_schedule
from baselines.random_eviction import RandomEviction
from baselines.snapkv import SnapKV
from baselines.streamingllm import StreamingLLM

__all__ = [
    "H2O",
    "Full",
    "PyramidKV",
    "RandomEviction",
    "SnapKV",
    "StreamingLLM",
    "pyramid_schedule",
]
