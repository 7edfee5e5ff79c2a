"""CapKV and the machinery to evict any Llama-family model's KV cache after prefill."""

from capkv.cap import CapKV
from capkv.capacity import log_det_capacity
from capkv.engine.budget import Budget
from capkv.engine.compression import CompressionRecord, evict
from capkv.engine.decoding import greedy_generate
from capkv.engine.method import EvictionMethod

__all__ = [
    "Budget",
    "CapKV",
    "CompressionRecord",
    "EvictionMethod",
    "evict",
    "greedy_generate",
    "log_det_capacity",
]
