"""Bytes a cache holds: measured from its tensors, and predicted by a formula.

:func:`held_bytes` walks every layer's stored tensors (packed data, scales, zero points, the
full-precision residual); a head-adaptive layer's boolean mask is bookkeeping, not cache, and
is left out. :func:`formula_bytes` predicts the same number right after
:func:`capkv.engine.quantization.quantized_cache` (residual empty): per layer and per K or V,
``slots x heads x head_dim x nbits / 8`` (packing pads each column to a whole byte) plus the
metadata of every group (scale and zero point in the cache's dtype for quanto and hqq, one
float32 scale per token or per channel for fp8; none for a 16-bit cast).

Bytes as a budget: :func:`tokens_within` is the most tokens per KV head a byte budget per head
and layer holds in a storage, and :func:`kept_share` the share of a prompt's tokens that a
fraction of the full cache's bytes holds. The full cache a fraction refers to is the prompt held
at 16 bits per value (:data:`REFERENCE_BITS`), whatever the model computes in: the cache a
bfloat16 deployment holds, so that a fraction means the same on a float32 CPU run and on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from transformers import Cache

from capkv.engine.budget import ByteBudget
from capkv.engine.quantization import HALF_DTYPES, CacheQuantization

REFERENCE_BITS = 16  # the full cache a kv_fraction is a share of: every value in 16 bits


@dataclass(frozen=True)
class KVShape:
    """What a model's cache is made of: layers, KV heads per layer, head width, and the bytes of
    one value in the model's dtype (4 for float32, 2 for bfloat16)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    element_size: int

    @classmethod
    def of(cls, config: Any, dtype: torch.dtype) -> KVShape:
        """The cache shape of a transformers config (text part) computing in ``dtype``."""
        config = getattr(config, "text_config", None) or config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        size = torch.empty((), dtype=dtype).element_size()
        return cls(config.num_hidden_layers, kv_heads, head_dim, size)

    def reference_bytes(self, tokens: int) -> int:
        """Bytes of ``tokens`` tokens per KV head and layer held at :data:`REFERENCE_BITS`."""
        return 2 * tokens * self.head_dim * REFERENCE_BITS // 8


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
        elif settings.quantization in HALF_DTYPES:
            total += 2 * values * settings.bits // 8
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


def head_layer_bytes(tokens: int, shape: KVShape, settings: CacheQuantization) -> Fraction:
    """Bytes per KV head and layer of a just-compressed cache keeping ``tokens`` per head."""
    total = formula_bytes(
        [tokens], shape.num_kv_heads, shape.head_dim, settings, shape.element_size
    )
    return Fraction(total, shape.num_kv_heads)


def tokens_within(kv_bytes: int, shape: KVShape, settings: CacheQuantization) -> int:
    """The most tokens per KV head whose storage takes at most ``kv_bytes`` bytes per KV head
    and layer (0 when not even one token fits): the token budget of ``kv_bytes=``."""
    low, high = 0, 1
    while head_layer_bytes(high, shape, settings) <= kv_bytes:
        low, high = high, 2 * high
    while high - low > 1:  # bytes never fall as tokens grow
        middle = (low + high) // 2
        if head_layer_bytes(middle, shape, settings) <= kv_bytes:
            low = middle
        else:
            high = middle
    return low


def token_rate(shape: KVShape, settings: CacheQuantization) -> Fraction:
    """Bytes one more token costs per KV head and layer in a long cache (scales and zero points
    of its groups included; an fp8 per-channel scale, paid once per layer, is not)."""
    unit = 64 * max(settings.q_group_size, shape.head_dim) * 8
    return (
        head_layer_bytes(2 * unit, shape, settings) - head_layer_bytes(unit, shape, settings)
    ) / unit


def kept_share(kv_fraction: float, shape: KVShape, settings: CacheQuantization) -> Fraction:
    """The share of a prompt's tokens that ``kv_fraction`` of its full cache's bytes (at
    :data:`REFERENCE_BITS`) holds in this storage; above 1 where the whole prompt fits."""
    reference = Fraction(shape.reference_bytes(1))
    return Fraction(kv_fraction).limit_denominator(10**6) * reference / token_rate(shape, settings)


def byte_budget(
    kv_bytes: int | None, kv_fraction: float | None, shape: KVShape, settings: CacheQuantization
) -> ByteBudget:
    """The token budget (``kv_bytes``) or ratio (``kv_fraction``) that a byte budget buys in a
    storage, refused in one sentence where it holds no token per KV head."""
    storage = f"cache.quantization={settings.quantization}" + (
        f" at {settings.bits} bits" if settings.active else ""
    )
    if kv_bytes is not None:
        tokens = tokens_within(kv_bytes, shape, settings)
        if tokens < 1:
            one = math.ceil(head_layer_bytes(1, shape, settings))
            raise ValueError(
                f"kv_bytes={kv_bytes} holds no token per KV head in {storage} (one token takes "
                f"{one} bytes per KV head and layer); pass kv_bytes={one} or more."
            )
        return ByteBudget(tokens=tokens, kv_bytes=kv_bytes)
    share = kept_share(kv_fraction, shape, settings)
    return ByteBudget(ratio=float(1 - share) if share < 1 else 0.0, kv_fraction=kv_fraction)
