"""Apply an eviction method to a transformers model as a context manager.

Inside ``with evict(model, method, budget=512):`` a prefill into an empty ``DynamicCache``
leaves every layer's cache compressed; decoding inside the context (``model.generate`` or
:func:`capkv.engine.decoding.greedy_generate`) continues at the original positions. Outside it the
model is exactly as before: the hooks are removed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import Cache, DynamicCache, PreTrainedModel

from capkv.engine.allocation import kept_mask
from capkv.engine.budget import Budget
from capkv.engine.decoding import check_head_masking, per_layer_masks, set_head_mask
from capkv.engine.hooks import (
    attention_layers,
    decoder,
    forward_hooks,
    hidden_states_of,
    layer_cache,
    mismatch,
    position_embeddings,
    rotary_embedding,
)
from capkv.engine.layer import LayerPrefill
from capkv.engine.method import EvictionMethod
from capkv.models import check_supported


@dataclass
class CompressionRecord:
    """What one prefill kept.

    Attributes
    ----------
    prompt_length : int
        Tokens in the prefill (0 until a prefill ran).
    kept : dict[int, torch.Tensor]
        Per layer, the sorted kept indices (B, H_kv, n); a layer left whole is absent. Where
        the KV heads keep different numbers of tokens (a head-adaptive allocation), each head's
        row is padded with -1 to the layer's largest head, ``n``.
    num_layers : int
        Number of decoder layers.
    kv_bytes : int or None
        Bytes the cache holds once compressed (and quantized), measured from its tensors
        (:func:`capkv.engine.kv_bytes.held_bytes`); None unless quantized or budgeted in bytes.
    kv_bytes_per_head_layer : float or None
        The same per KV head per layer.
    kv_fraction_held : float or None
        ``kv_bytes`` as a share of the prompt's full cache at 16 bits per value.
    """

    num_layers: int
    prompt_length: int = 0
    kept: dict[int, torch.Tensor] = field(default_factory=dict)
    kv_bytes: int | None = None
    kv_bytes_per_head_layer: float | None = None
    kv_fraction_held: float | None = None

    def kept_per_head(self) -> list[list[int]] | None:
        """Real tokens kept by every KV head of every layer (first batch row); None before a
        compressing prefill."""
        if not self.kept:
            return None
        num_kv_heads = next(iter(self.kept.values())).shape[1]
        return [
            kept_mask(self.kept[i][0]).sum(dim=-1).tolist()
            if i in self.kept
            else [self.prompt_length] * num_kv_heads
            for i in range(self.num_layers)
        ]

    def kept_per_layer(self) -> list[int | float]:
        """Real tokens kept per KV head in each layer (the mean over its heads: a whole number
        unless the allocation moved tokens between layers)."""
        per_head = self.kept_per_head()
        if per_head is None:
            return [self.prompt_length] * self.num_layers
        means = [sum(heads) / len(heads) for heads in per_head]
        return [int(mean) if mean.is_integer() else round(mean, 2) for mean in means]

    def ragged(self) -> bool:
        """True when the KV heads of some layer keep different numbers of tokens (the padded,
        per-head masked layout of head-adaptive and model-wide allocations)."""
        per_head = self.kept_per_head()
        return per_head is not None and any(min(heads) != max(heads) for heads in per_head)

    def padded_per_layer(self) -> list[int]:
        """Cache slots per KV head in each layer: the largest head's count (padding included)."""
        return [
            int(self.kept[i].shape[-1]) if i in self.kept else self.prompt_length
            for i in range(self.num_layers)
        ]


def prefill_state(
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    rotary_emb: nn.Module,
    num_layers: int,
    output: tuple | None = None,
) -> LayerPrefill | None:
    """The layer's prefill state after its forward, or None if this forward is not a prefill.

    A prefill is a forward that filled an empty cache layer (its cache holds exactly the
    tokens of this forward). ``output``, the layer's own output, gives the attention weights
    where the attention implementation returns them (eager).
    """
    hidden_states = hidden_states_of(args, kwargs)
    cache_layer = layer_cache(module, kwargs).layers[module.layer_idx]
    if cache_layer.get_seq_length() != hidden_states.shape[1]:
        return None
    if hidden_states.shape[0] != 1:
        raise ValueError(
            f"KV eviction supports batch size 1, got a batch of {hidden_states.shape[0]}: "
            "run the prompts one at a time."
        )
    cos, sin = position_embeddings(module, kwargs)
    return LayerPrefill(
        module=module,
        rotary_emb=rotary_emb,
        num_layers=num_layers,
        hidden_states=hidden_states,
        keys=cache_layer.keys,
        values=cache_layer.values,
        cos=cos,
        sin=sin,
        attentions=output[1] if isinstance(output, tuple) and len(output) > 1 else None,
    )


def gather_tokens(states: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Select tokens (B, H_kv, n) from cached states (B, H_kv, T, d).

    A padding slot (index -1) receives a copy of token 0; attention masks it out.
    """
    expanded = indices.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, states.shape[-1])
    return states.gather(2, expanded).contiguous()


def resolve_budget(
    method: EvictionMethod, budget: Budget | int | None, ratio: float | None
) -> Budget | None:
    """A validated Budget from either convention (None for methods that never evict)."""
    if isinstance(budget, Budget):
        if ratio is not None:
            raise ValueError("Give the ratio inside the Budget or as ratio=, not both.")
        resolved = budget
    elif not method.evicts and budget is None and ratio is None:
        return None
    else:
        resolved = Budget(tokens=budget, ratio=ratio)
    method.check_budget(resolved)
    return resolved


@contextmanager
def after_each_prefill(
    model: PreTrainedModel,
    callback: Callable[[LayerPrefill, Cache], None],
    on_prefill_end: Callable[[], None] | None = None,
) -> Iterator[None]:
    """Call ``callback(state, cache)`` after every attention layer's prefill inside this context.

    ``state`` is the layer's :class:`LayerPrefill` (its full cache, hidden states and rotary
    tables) and ``cache`` the cache it wrote into; forwards that are not prefills (decoding
    steps) are left alone. ``on_prefill_end()``, if given, runs once every layer of a prefill
    has. The callbacks run without autograd.

    Never silent: the first forward of the model inside the context must be a prefill in every
    attention layer, and any later prefill too; otherwise :class:`TransformersMismatch` is
    raised at the end of that forward, naming the transformers version.
    """
    check_supported(model)
    layers = attention_layers(model)
    rotary_emb = rotary_embedding(model)
    prefilled: list[int] = []  # attention layers the current forward prefilled
    forwards = 0

    def start_forward(module: nn.Module, args: tuple, kwargs: dict) -> None:
        prefilled.clear()

    def after_layer(module: nn.Module, args: tuple, kwargs: dict, output):
        state = prefill_state(module, args, kwargs, rotary_emb, len(layers), output)
        if state is not None:
            prefilled.append(module.layer_idx)
            with torch.no_grad():
                callback(state, layer_cache(module, kwargs))
        return output

    def end_forward(module: nn.Module, args: tuple, kwargs: dict, output):
        nonlocal forwards
        forwards += 1
        if (forwards == 1 or prefilled) and len(prefilled) != len(layers):
            raise mismatch(
                f"A prefill inside capkv's eviction hooks found an empty cache to fill in "
                f"{len(prefilled)} of the model's {len(layers)} attention layers, so the cache "
                "was not compressed in every layer",
                "prefill into a new, empty DynamicCache inside the context; if you did, install "
                "a tested transformers release",
            )
        if prefilled and on_prefill_end is not None:
            with torch.no_grad():
                on_prefill_end()
        return output

    with (
        forward_hooks([decoder(model)], pre=start_forward, post=end_forward),
        forward_hooks(layers, post=after_layer),
    ):
        yield


@contextmanager
def evict(
    model: PreTrainedModel,
    method: EvictionMethod,
    budget: Budget | int | None = None,
    ratio: float | None = None,
) -> Iterator[CompressionRecord]:
    """Compress every layer's cache at the end of a prefill run inside this context.

    Parameters
    ----------
    model : PreTrainedModel
        A Llama-family causal LM (Llama, Mistral, Qwen2, Qwen3), any attention implementation.
    method : EvictionMethod
        Which tokens to keep (CapKV or a baseline).
    budget : Budget or int, optional
        Tokens kept per KV head per layer (protected tokens included), or a Budget.
    ratio : float, optional
        Fraction of the prompt removed, in [0, 1) (kvpress's convention). Exactly one of
        ``budget`` and ``ratio`` is given, except for methods that never evict.

    Yields
    ------
    CompressionRecord
        Filled by the prefill: the prompt length and the kept indices of every layer.

    Under ``allocation=model`` every layer's cache stays whole until the last layer's prefill,
    then all are compressed together.
    """
    check_supported(model)
    resolved = resolve_budget(method, budget, ratio)
    check_allocation(model, method)
    record = CompressionRecord(num_layers=len(attention_layers(model)))
    deferred: list[tuple[LayerPrefill, Cache]] = []

    def write(state: LayerPrefill, cache: Cache, indices: torch.Tensor | None) -> None:
        if indices is not None:
            cache_layer = cache.layers[state.layer_idx]
            cache_layer.keys = gather_tokens(state.keys, indices)
            cache_layer.values = gather_tokens(state.values, indices)
            set_head_mask(cache_layer, indices)
            record.kept[state.layer_idx] = indices

    def compress(state: LayerPrefill, cache: Cache) -> None:
        record.prompt_length = state.prompt_length
        if resolved is not None and method.model_wide:
            deferred.append((state, cache))
            return
        write(state, cache, None if resolved is None else method.kept_indices(state, resolved))

    def compress_all() -> None:
        if not deferred:
            return
        kept = method.select_model_wide([state for state, _ in deferred], resolved)
        for (state, cache), indices in zip(deferred, kept, strict=True):
            write(state, cache, indices)
        deferred.clear()

    with after_each_prefill(model, compress, compress_all), per_layer_masks(model):
        yield record


def check_allocation(model: PreTrainedModel, method: EvictionMethod) -> None:
    """A head-adaptive allocation needs an attention implementation that masks per head."""
    if method.allocation != "uniform":
        check_head_masking(model.config._attn_implementation)


@contextmanager
def record_kept(
    model: PreTrainedModel,
    selections: Sequence[tuple[EvictionMethod, Budget | None]],
    on_layer: Callable[[LayerPrefill, list[torch.Tensor | None]], None] | None = None,
) -> Iterator[list[CompressionRecord]]:
    """Inside this context a prefill keeps its full cache and records, for every
    (method, budget) pair, the tokens that ``evict`` would have kept.

    Prefill hidden states do not depend on how earlier layers' caches are compressed (every
    layer attends over its full cache before the eviction hook runs), so one prefill decides the
    kept tokens of every pair. Each method scores a layer once, whatever its number of budgets.
    Gather a pair's cache with :func:`gathered_cache`. ``on_layer(state, kept)``, if given, sees
    every layer's prefill state with the kept indices of every pair (None: all kept). With a
    pair under ``allocation=model``, the layers' prefill states are held until the end of the
    prefill, when that pair chooses every layer together and ``on_layer`` sees every layer.
    """
    records = [CompressionRecord(num_layers=len(attention_layers(model))) for _ in selections]
    for method, _ in selections:
        check_allocation(model, method)
    model_wide = any(budget is not None and m.model_wide for m, budget in selections)
    states: list[LayerPrefill] = []

    def record(state: LayerPrefill, cache: Cache) -> None:
        scores: dict[int, torch.Tensor] = {}
        for (method, budget), cell_record in zip(selections, records, strict=True):
            cell_record.prompt_length = state.prompt_length
            if budget is None or method.model_wide or method.kept_count(state, budget) is None:
                continue
            if id(method) not in scores:
                scores[id(method)] = method.score(state)
            cell_record.kept[state.layer_idx] = method.kept_indices(
                state, budget, scores=scores[id(method)]
            )
        if model_wide:
            states.append(state)
        elif on_layer is not None:
            on_layer(state, [cell_record.kept.get(state.layer_idx) for cell_record in records])

    def finish() -> None:
        for (method, budget), cell_record in zip(selections, records, strict=True):
            if budget is not None and method.model_wide:
                kept = method.select_model_wide(states, budget)
                for state, indices in zip(states, kept, strict=True):
                    if indices is not None:
                        cell_record.kept[state.layer_idx] = indices
        if on_layer is not None:
            for state in states:
                on_layer(state, [cell_record.kept.get(state.layer_idx) for cell_record in records])
        states.clear()

    with after_each_prefill(model, record, finish if model_wide else None):
        yield records


def gathered_cache(full_cache: Cache, record: CompressionRecord) -> DynamicCache:
    """A new cache holding, in every layer, the tokens ``record`` kept from ``full_cache``."""
    cache = DynamicCache()
    for layer_idx in range(record.num_layers):
        layer = full_cache.layers[layer_idx]
        keys, values = layer.keys, layer.values
        if layer_idx in record.kept:
            keys = gather_tokens(keys, record.kept[layer_idx])
            values = gather_tokens(values, record.kept[layer_idx])
        cache.update(keys, values, layer_idx)
        if layer_idx in record.kept:
            set_head_mask(cache.layers[layer_idx], record.kept[layer_idx])
    return cache
