"""CapKV and the machinery to evict any Llama-family model's KV cache after prefill."""

from capkv.budget import Budget
from capkv.cap import CapKV
from capkv.capacity import log_det_capacity
from capkv.decoding import greedy_generate
from capkv.engine import CompressionRecord, evict
from capkv.method import EvictionMethod

__all__ = [
    "Budget",
    "CapKV",
    "CompressionRecord",
    "EvictionMethod",
    "evict",
    "greedy_generate",
    "log_det_capacity",
]
