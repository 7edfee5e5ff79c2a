"""Where capkv meets transformers: the attention layers, hooks on them, and every name that
differs between transformers releases.

Tested on transformers 4.56 to 5.24. What differs between them, and is handled only here:

- the cache argument: the attention and decoder layers and the model's ``forward`` take
  ``past_key_values`` in 4.56 to 5.2 (4.56 still maps an old ``past_key_value``) and ``cache`` in
  5.24, which warns that ``past_key_values`` goes in 5.40;
- ``Cache.crop``: 5.2 takes the length to keep (or a negative number of tokens to drop), 5.24
  only the negative number;
- the RoPE base: ``config.rope_theta`` in 4.x, ``config.rope_parameters["rope_theta"]`` in 5.x.

Nothing outside this module looks up a cache or a rotary table in a hook's arguments or passes a
cache to a model by name, so a release that renames an argument is fixed in one place. A lookup
that finds nothing raises :class:`TransformersMismatch` naming the installed version: it never
lets a prefill run uncompressed.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import transformers
from torch import nn
from transformers import Cache, PreTrainedModel

# Names under which a release passes the KV cache, newest first.
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")
POSITION_EMBEDDINGS_ARGUMENT = "position_embeddings"
TESTED_TRANSFORMERS = "4.56-5.24"


class TransformersMismatch(ValueError):
    """The installed transformers runs the model in a way capkv's hooks do not recognise, so a
    cache that should be compressed would not be."""


def library_versions() -> dict[str, str]:
    """The transformers and torch versions in use, for a run's metadata."""
    return {"transformers": str(transformers.__version__), "torch": str(torch.__version__)}


def mismatch(problem: str, remedy: str = "") -> TransformersMismatch:
    """An error naming what went wrong, the installed transformers and the tested releases."""
    remedy = remedy or (
        "install a tested transformers release, or teach capkv/engine/hooks.py this release's "
        "argument names"
    )
    return TransformersMismatch(
        f"{problem} under transformers {transformers.__version__} (capkv is tested on "
        f"{TESTED_TRANSFORMERS}): {remedy}."
    )


def decoder(model: PreTrainedModel) -> nn.Module:
    """The decoder stack of a Llama-family causal LM (embeddings, layers, rotary embedding)."""
    return model.model


def attention_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The self-attention modules of a Llama-family decoder, in layer order."""
    return [layer.self_attn for layer in decoder(model).layers]


def rotary_embedding(model: PreTrainedModel) -> nn.Module:
    """The model's rotary embedding module."""
    return decoder(model).rotary_emb


def layer_cache(module: nn.Module, kwargs: dict) -> Cache:
    """The cache an attention layer's forward received.

    Raises
    ------
    TransformersMismatch
        If the forward got no cache: under none of ``CACHE_ARGUMENTS``, or None there.
    """
    for name in CACHE_ARGUMENTS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    elsewhere = [name for name, value in kwargs.items() if isinstance(value, Cache)]
    if elsewhere:
        raise mismatch(
            f"Attention layer {module.layer_idx} got its KV cache as {elsewhere[0]!r}, not "
            f"under any name capkv knows ({', '.join(CACHE_ARGUMENTS)}), so no cache could be "
            "compressed"
        )
    raise mismatch(
        f"Attention layer {module.layer_idx} got no KV cache (its arguments: "
        f"{', '.join(sorted(kwargs))}), so no cache could be compressed",
        "run the model with a DynamicCache and use_cache left on; if you did, install a tested "
        "transformers release, or teach capkv/engine/hooks.py this release's argument names",
    )


def rope_theta(config: transformers.PretrainedConfig) -> float:
    """The RoPE base frequency of a model config."""
    parameters = getattr(config, "rope_parameters", None)
    return parameters["rope_theta"] if parameters is not None else config.rope_theta


def hidden_states_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states entering an attention layer (passed by name or first)."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def position_embeddings(module: nn.Module, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The RoPE tables ``(cos, sin)`` an attention layer's forward received."""
    if kwargs.get(POSITION_EMBEDDINGS_ARGUMENT) is None:
        raise mismatch(
            f"Attention layer {module.layer_idx} got no {POSITION_EMBEDDINGS_ARGUMENT!r} "
            f"(its arguments: {', '.join(sorted(kwargs))})"
        )
    return kwargs[POSITION_EMBEDDINGS_ARGUMENT]


@functools.cache
def _cache_parameter(forward_owner: type) -> str:
    parameters = inspect.signature(forward_owner.forward).parameters
    for name in CACHE_ARGUMENTS:
        if name in parameters:
            return name
    raise mismatch(
        f"{forward_owner.__name__}.forward takes none of {', '.join(CACHE_ARGUMENTS)}, so capkv "
        "cannot pass it a cache"
    )


def run_with_cache(model: nn.Module, input_ids: torch.Tensor, cache: Cache, **inputs: Any) -> Any:
    """Run a causal LM (or its decoder) on ``input_ids`` into ``cache``, passed under the name
    its forward takes; ``inputs`` are further keyword arguments of the forward."""
    return model(input_ids=input_ids, **inputs, **{_cache_parameter(type(model)): cache})


def crop_cache(cache: Cache, length: int) -> None:
    """Drop every layer's tokens after the first ``length``."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)


@contextmanager
def forward_hooks(
    modules: Sequence[nn.Module],
    pre: Callable[[nn.Module, tuple, dict], Any] | None = None,
    post: Callable[[nn.Module, tuple, dict, Any], Any] | None = None,
) -> Iterator[None]:
    """Register ``pre`` (a forward pre-hook) and ``post`` (a forward hook) on every module, both
    receiving the forward's keyword arguments; all are removed when the context exits."""
    handles = []
    try:
        for module in modules:
            if pre is not None:
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            if post is not None:
                handles.append(module.register_forward_hook(post, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
