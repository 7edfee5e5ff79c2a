"""Bytes a cache holds: measured from its tensors, and predicted by a formula.

:func:`held_bytes` walks every layer's stored tensors (packed data, scales, zero points, the
full-precision residual); a head-adaptive layer's boolean mask is bookkeeping, not cache, and
is left out. :func:`formula_bytes` predicts the same number right after
:func:`capkv.engine.quantization.quantized_cache` (residual empty): per layer and per K or V,
``slots x heads x head_dim x nbits / 8`` (packing pads each column to a whole byte) plus the metadata of every group (scale and zero point
in the cache's dtype for quanto and hqq, one float32 scale per token or per channel for fp8).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Cache

from capkv.engine.quantization import CacheQuantization


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside ``obj`` (a tensor, a tensor subclass such as quanto's packed
    tensors, or tuples, lists and dicts of them)."""
    if isinstance(obj, torch.Tensor):
        flatten = getattr(obj, "__tensor_flatten__", None)
        if flatten is not None and type(obj) is not torch.Tensor:
            names, _ = flatten()
            return sum(tensor_bytes(getattr(obj, name)) for name in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, tuple | list):
        return sum(tensor_bytes(item) for item in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(item) for item in obj.values())
    return 0


def layer_bytes(layer: Any) -> int:
    """Bytes one cache layer holds: its quantized states (if any) and its full-precision ones."""
    stored = [getattr(layer, "keys", None), getattr(layer, "values", None)]
    for name in ("_quantized_keys", "_quantized_values", "key_blocks", "value_blocks"):
        stored.append(getattr(layer, name, None))
    return sum(tensor_bytes(item) for item in stored if item is not None)


def held_bytes(cache: Cache) -> int:
    """Bytes the whole cache holds, measured from its tensors."""
    return sum(layer_bytes(layer) for layer in cache.layers)


def formula_bytes(
    slots_per_layer: list[int],
    num_kv_heads: int,
    head_dim: int,
    settings: CacheQuantization,
    element_size: int,
) -> int:
    """Bytes a just-compressed (and quantized) cache holds, from its shape alone.

    Parameters
    ----------
    slots_per_layer : list of int
        Cache slots per KV head in each layer (a head-adaptive layer's padding included).
    num_kv_heads, head_dim : int
        The model's KV heads and their width.
    settings : CacheQuantization
        How the cache is stored.
    element_size : int
        Bytes of one full-precision value (4 for float32, 2 for bfloat16).
    """
    total = 0
    for slots in slots_per_layer:
        values = num_kv_heads * slots * head_dim  # per K (and as many per V)
        if not settings.active:
            total += 2 * values * element_size
        elif settings.quantization == "fp8":
            for axis in (settings.axis_key, settings.axis_value):
                scales = num_kv_heads * (slots if axis == 0 else head_dim)
                total += values + 4 * scales
        else:
            for axis in (settings.axis_key, settings.axis_value):
                total += (
                    packed_bytes(values, settings, axis)
                    + 2 * groups_of(values, settings) * element_size
                )
    return total


def groups_of(values: int, settings: CacheQuantization) -> int:
    return values // settings.q_group_size


def packed_bytes(values: int, settings: CacheQuantization, axis: int) -> int:
    """Bytes of ``values`` integers packed ``8 / nbits`` to a byte.

    Both backends lay the tensor out as a (rows, columns) grid of groups and pack along the rows:
    quanto's axis 0 and HQQ's axis 1 put one group per row, the other axes one per column; an
    unfilled last byte of a column is padding, and counted.
    """
    size, groups = settings.q_group_size, groups_of(values, settings)
    one_per_row = (settings.quantization == "quanto") == (axis == 0)
    rows, columns = (groups, size) if one_per_row else (size, groups)
    per_byte = 8 // settings.bits
    return -(-rows // per_byte) * columns


def per_head_layer(kv_bytes: int, num_layers: int, num_kv_heads: int) -> float:
    """Bytes per KV head per layer, rounded to a hundredth."""
    return round(kv_bytes / (num_layers * num_kv_heads), 2)
