"""Quantized storage of a compressed cache: evict first, then hold the kept keys and values in
fewer bits.

After a prefill has been compressed (:func:`capkv.engine.compression.evict`, or a sweep cell's
:func:`capkv.engine.compression.gathered_cache`), :func:`quantized_cache` moves every layer's kept
keys and values into a quantized layer, layer by layer, so PyramidKV's per-layer lengths and a
head-adaptive layer's padding mask (``capkv_head_mask``) stay as they were. The backends are
transformers' own KIVI-style layers (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache", arXiv 2402.02750; ``transformers.cache_utils.QuantoQuantizedLayer``
and ``HQQQuantizedLayer``) and :class:`Fp8Layer`, ours (transformers 4.56 has no fp8 layer and
5.24's quantizes per tensor).

What is quantized when: the kept prompt is handed to the fresh layer's first ``update``, which
quantizes all of it at once (the full-precision residual starts empty). Tokens decoded after
that go to the residual, kept in full precision; once it would hold ``residual_length`` tokens,
the layer quantizes it (transformers' layers re-quantize the whole layer then, ours appends the
residual as a new block).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from capkv.engine.decoding import HEAD_MASK

BACKENDS = ("none", "bf16", "fp16", "quanto", "hqq", "fp8")
EXTRAS = {"quanto": ("optimum.quanto", "quanto"), "hqq": ("hqq", "hqq")}  # module, pip extra
NBITS = {"bf16": (16,), "fp16": (16,), "quanto": (2, 4), "hqq": (2, 4, 8), "fp8": (8,)}
DEFAULT_NBITS = {"bf16": 16, "fp16": 16, "quanto": 4, "hqq": 4, "fp8": 8}
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # 16 bits, no scales
# quanto's and ours: 0 groups within a token (over channels), -1 within a channel (over tokens);
# HQQ's: 1 within a token, 0 across the (flattened) tokens. A 16-bit cast has no groups.
AXES = {"quanto": (0, -1), "hqq": (0, 1), "fp8": (0, -1)}


@dataclass
class CacheQuantization:
    """How the compressed cache is stored (the ``cache:`` section of ``conf/config.yaml``).

    Attributes
    ----------
    quantization : str
        ``none`` (the model's precision, the default), ``bf16`` or ``fp16`` (a 16-bit cast:
        what a GPU deployment holds, on a float32 model too), ``quanto``, ``hqq`` or ``fp8``.
    nbits : int, optional
        Bits per stored value; None: 16 for bf16 and fp16, 4 for quanto and hqq, 8 for fp8.
    axis_key, axis_value : int
        The backend's grouping axis for keys and values (see ``AXES``; KIVI groups keys per
        channel and values per token).
    q_group_size : int
        Values sharing one scale and zero point (quanto and hqq).
    residual_length : int
        Newest decoded tokens kept in full precision before they are quantized.
    """

    quantization: str = "none"
    nbits: int | None = None
    axis_key: int = 0
    axis_value: int = 0
    q_group_size: int = 64
    residual_length: int = 128

    @property
    def active(self) -> bool:
        return self.quantization != "none"

    @property
    def bits(self) -> int | None:
        """The bits per value in use (None without quantization)."""
        if not self.active:
            return None
        return self.nbits if self.nbits is not None else DEFAULT_NBITS[self.quantization]

    @property
    def label(self) -> str:
        """The part of a run's variant naming the storage: ``q4-quanto``, or empty for none."""
        return f"q{self.bits}-{self.quantization}" if self.active else ""

    def check(self) -> None:
        """Refuse a setting the backend does not take, in one sentence."""
        backend = self.quantization
        if backend not in BACKENDS:
            raise ValueError(
                f"cache.quantization={backend!r} is not a backend; choose one of: "
                f"{', '.join(BACKENDS)}."
            )
        if not self.active:
            return
        if self.bits not in NBITS[backend]:
            raise ValueError(
                f"cache.nbits={self.nbits} is not offered by cache.quantization={backend}; pass "
                f"one of {', '.join(map(str, NBITS[backend]))}."
            )
        for key in ("axis_key", "axis_value"):
            if backend in AXES and getattr(self, key) not in AXES[backend]:
                raise ValueError(
                    f"cache.{key}={getattr(self, key)} is not an axis of cache.quantization="
                    f"{backend}; pass {' or '.join(map(str, AXES[backend]))}."
                )
        for key in ("q_group_size", "residual_length"):
            if getattr(self, key) < 1:
                raise ValueError(f"cache.{key}={getattr(self, key)} is not positive; pass e.g. 64.")
        if backend in EXTRAS:
            module, extra = EXTRAS[backend]
            if importlib.util.find_spec(module.split(".")[0]) is None or (
                "." in module and importlib.util.find_spec(module) is None
            ):
                raise ValueError(
                    f"cache.quantization={backend} needs {module}, which is not installed; run "
                    f"pip install -e '.[{extra}]' or choose cache.quantization=fp8."
                )


STORAGE_NAME = re.compile(r"(none|bf16|fp16|fp8)|(quanto|hqq)(\d+)")


def named_storage(name: str, base: CacheQuantization) -> CacheQuantization:
    """``base`` (the ``cache:`` section) with the backend and bits an entry of ``caches=[...]``
    names: ``none``, ``bf16``, ``fp16``, ``fp8``, or a backend and its bits (``hqq8``,
    ``hqq4``, ``quanto2``)."""
    match = STORAGE_NAME.fullmatch(str(name))
    if match is None:
        raise ValueError(
            f"caches=[...] holds {name!r}, which names no storage; pass none, bf16, fp16, fp8, "
            "or a backend and its bits such as hqq8, hqq4, quanto2."
        )
    if match.group(1) is not None:
        return dataclasses.replace(base, quantization=match.group(1), nbits=None)
    return dataclasses.replace(base, quantization=match.group(2), nbits=int(match.group(3)))


def run_storages(base: CacheQuantization, names: list[str] | None) -> list[CacheQuantization]:
    """How a run's cells store their caches: ``base`` (the ``cache:`` section), or one storage
    per entry of ``caches=[...]`` (:func:`named_storage`)."""
    return [named_storage(name, base) for name in names] if names else [base]


class Fp8Layer(DynamicLayer):
    """A cache layer holding keys and values as ``torch.float8_e4m3fn`` with float32 scales.

    Axis 0 scales each token's channels together (per token), axis -1 each channel over a block
    of tokens (per channel, KIVI's choice for keys). The first ``update`` quantizes its tokens as
    one block; later tokens wait in a full-precision residual until it would reach
    ``residual_length`` tokens, then become a block of their own, so old blocks never change.
    """

    dtype_fp8 = torch.float8_e4m3fn
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    is_croppable = False

    def __init__(self, axis_key: int = 0, axis_value: int = 0, residual_length: int = 128):
        super().__init__()
        self.axis_key = axis_key
        self.axis_value = axis_value
        self.residual_length = residual_length
        self.cumulative_length = 0
        self.key_blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.value_blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.keys = self.values = None
        self.is_initialized = False

    def quantize(self, states: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp8 data, float32 scale) of ``states`` (B, H, n, d): per token or per channel."""
        reduce = -1 if axis == 0 else -2
        amax = states.abs().float().amax(dim=reduce, keepdim=True)
        scale = (amax / self.fp8_max).clamp(min=torch.finfo(torch.float32).tiny)
        return (states.float() / scale).to(self.dtype_fp8), scale

    def dequantized(self, blocks: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        return torch.cat([(data.float() * scale).to(self.dtype) for data, scale in blocks], dim=-2)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.cumulative_length += key_states.shape[-2]
        if not self.is_initialized:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.keys = key_states.new_zeros(*key_states.shape[:-2], 0, key_states.shape[-1])
            self.values = value_states.new_zeros(
                *value_states.shape[:-2], 0, value_states.shape[-1]
            )
            self.key_blocks.append(self.quantize(key_states, self.axis_key))
            self.value_blocks.append(self.quantize(value_states, self.axis_value))
            self.is_initialized = True
            return key_states, value_states
        residual_keys = torch.cat([self.keys, key_states], dim=-2)
        residual_values = torch.cat([self.values, value_states], dim=-2)
        keys = torch.cat([self.dequantized(self.key_blocks), residual_keys], dim=-2)
        values = torch.cat([self.dequantized(self.value_blocks), residual_values], dim=-2)
        if residual_keys.shape[-2] >= self.residual_length:
            self.key_blocks.append(self.quantize(residual_keys, self.axis_key))
            self.value_blocks.append(self.quantize(residual_values, self.axis_value))
            residual_keys, residual_values = residual_keys[..., :0, :], residual_values[..., :0, :]
        self.keys, self.values = residual_keys, residual_values
        return keys, values

    def get_seq_length(self, *args: Any) -> int:
        return self.cumulative_length

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("An fp8 cache layer cannot be cropped.")


class HalfLayer(DynamicLayer):
    """A cache layer holding keys and values in a 16-bit dtype (bfloat16 or float16), read back
    in the model's dtype: the cache a bfloat16 deployment holds, for a model that computes in
    float32 (SmolLM2 on the CPU). Every token, decoded ones too, is stored rounded; no scales."""

    is_croppable = False

    def __init__(self, storage_dtype: torch.dtype):
        super().__init__()
        self.storage_dtype = storage_dtype
        self.keys = self.values = None
        self.is_initialized = False

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        new_keys, new_values = (
            key_states.to(self.storage_dtype),
            value_states.to(self.storage_dtype),
        )
        if not self.is_initialized:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.keys, self.values = new_keys, new_values
            self.is_initialized = True
        else:
            self.keys = torch.cat([self.keys, new_keys], dim=-2)
            self.values = torch.cat([self.values, new_values], dim=-2)
        return self.keys.to(self.dtype), self.values.to(self.dtype)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("A 16-bit storage layer cannot be cropped.")


def quantized_layer(settings: CacheQuantization) -> DynamicLayer:
    """An empty layer of ``settings``' backend."""
    if settings.quantization in HALF_DTYPES:
        return HalfLayer(HALF_DTYPES[settings.quantization])
    if settings.quantization == "fp8":
        return Fp8Layer(settings.axis_key, settings.axis_value, settings.residual_length)
    from transformers.cache_utils import HQQQuantizedLayer, QuantoQuantizedLayer

    layer_class = QuantoQuantizedLayer if settings.quantization == "quanto" else HQQQuantizedLayer
    return layer_class(
        nbits=settings.bits,
        axis_key=settings.axis_key,
        axis_value=settings.axis_value,
        q_group_size=settings.q_group_size,
        residual_length=settings.residual_length,
    )


def quantized_cache(cache: Cache, settings: CacheQuantization) -> Cache:
    """A cache holding ``cache``'s (compressed) keys and values quantized, layer by layer.

    Every layer keeps its own length and its head mask; the kept tokens are quantized at once
    (the residual starts empty). ``cache`` itself is left as it was.
    """
    layers = []
    for layer_idx, layer in enumerate(cache.layers):
        quantized = quantized_layer(settings)
        try:
            quantized.update(layer.keys, layer.values)
        except ValueError as error:  # e.g. quanto: a group size that does not divide the layer
            raise ValueError(
                f"cache.quantization={settings.quantization} cannot quantize layer {layer_idx} "
                f"({layer.keys.shape[-2]} tokens per head): {error}; choose another "
                "cache.q_group_size or cache.axis_key/axis_value."
            ) from None
        head_mask = getattr(layer, HEAD_MASK, None)
        if head_mask is not None:
            setattr(quantized, HEAD_MASK, head_mask)
        layers.append(quantized)
    return Cache(layers=layers)
