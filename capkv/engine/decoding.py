"""Decoding from a compressed cache: per-layer causal masks and a greedy loop.

After eviction each layer's cache is shorter than the prompt, and with per-layer budgets
(PyramidKV) the layers no longer agree on a length, while transformers builds one mask for all
layers from layer 0 and the cache position. The pre-hooks here replace that mask in every
attention layer with one built from the layer's own cache length: new tokens see the whole
kept cache and each other causally. Positions (RoPE) keep counting the uncompressed prompt.

With a head-adaptive allocation the KV heads of one layer keep different numbers of tokens: the
layer's cache is padded to its largest head and holds a per-head mask of its real tokens
(:func:`set_head_mask`); the mask built for that layer then also hides each head's padding from
every query head of its group (eager and sdpa; other attention kernels cannot take a per-head
mask and are refused).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache, DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from capkv.engine.allocation import is_ragged, kept_mask
from capkv.engine.hooks import (
    CACHE_ARGUMENTS,
    POSITION_EMBEDDINGS_ARGUMENT,
    attention_layers,
    decoder,
    forward_hooks,
    hidden_states_of,
    layer_cache,
    mismatch,
    run_with_cache,
)


def layer_causal_mask(
    cached_length: int, new_length: int, attn_implementation: str, dtype: torch.dtype, device
) -> torch.Tensor | None:
    """Mask of ``new_length`` queries over ``cached_length`` kept tokens plus themselves.

    Returns None where the attention kernel already does the right thing: a single query
    attends to everything, and flash-attention aligns its causal mask bottom-right.
    """
    if new_length == 1 or attn_implementation.startswith("flash"):
        return None
    total = cached_length + new_length
    rows = torch.arange(new_length, device=device).unsqueeze(1)
    allowed = torch.arange(total, device=device).unsqueeze(0) <= rows + cached_length
    allowed = allowed.view(1, 1, new_length, total)
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


HEAD_MASKING = ("eager", "sdpa")  # attention implementations that take a per-head mask
HEAD_MASK = "capkv_head_mask"  # attribute of a cache layer whose KV heads keep different counts


def check_head_masking(attn_implementation: str) -> None:
    """Refuse an attention implementation that cannot mask each KV head's own kept tokens."""
    if attn_implementation not in HEAD_MASKING:
        raise ValueError(
            f"attn_implementation={attn_implementation} cannot mask each KV head's own kept "
            "tokens, which a head-adaptive allocation needs; use model.attn_implementation=sdpa "
            "(or eager), or method.allocation=uniform."
        )


def set_head_mask(cache_layer, indices: torch.Tensor) -> None:
    """Mark which slots of a cache layer gathered by ``indices`` (B, H_kv, n) hold real tokens.

    Nothing is marked when every KV head keeps ``n`` tokens.
    """
    if is_ragged(indices):
        setattr(cache_layer, HEAD_MASK, kept_mask(indices))
    elif hasattr(cache_layer, HEAD_MASK):
        delattr(cache_layer, HEAD_MASK)


def head_causal_mask(
    head_mask: torch.Tensor,
    cached_length: int,
    new_length: int,
    group_size: int,
    attn_implementation: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Mask (B, H, new, cached + new) of ``new_length`` queries over a padded cache.

    ``head_mask`` (B, H_kv, n) marks the real tokens of the first ``n`` cached slots; slots after
    them (tokens decoded since) are real in every head. Each KV head's row is repeated for the
    ``group_size`` query heads that read it.
    """
    check_head_masking(attn_implementation)
    device = head_mask.device
    bsz, _, padded = head_mask.shape
    total = cached_length + new_length
    rows = torch.arange(new_length, device=device).unsqueeze(1)
    causal = torch.arange(total, device=device).unsqueeze(0) <= rows + cached_length
    present = torch.ones(bsz, head_mask.shape[1], total, dtype=torch.bool, device=device)
    present[..., :padded] = head_mask
    allowed = causal.view(1, 1, new_length, total) & present.unsqueeze(2)
    allowed = allowed.repeat_interleave(group_size, dim=1)
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def _mask_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    cache = layer_cache(module, kwargs)
    cached_length = cache.get_seq_length(module.layer_idx)
    if cached_length == 0:
        return args, kwargs
    hidden_states = hidden_states_of(args, kwargs)
    head_mask = getattr(cache.layers[module.layer_idx], HEAD_MASK, None)
    if head_mask is not None:
        kwargs["attention_mask"] = head_causal_mask(
            head_mask,
            cached_length,
            hidden_states.shape[1],
            module.config.num_attention_heads // module.config.num_key_value_heads,
            module.config._attn_implementation,
            hidden_states.dtype,
        )
        return args, kwargs
    kwargs["attention_mask"] = layer_causal_mask(
        cached_length,
        hidden_states.shape[1],
        module.config._attn_implementation,
        hidden_states.dtype,
        hidden_states.device,
    )
    return args, kwargs


@contextmanager
def per_layer_masks(model: PreTrainedModel) -> Iterator[None]:
    """While active, every attention layer masks against its own cache length."""
    with forward_hooks(attention_layers(model), pre=_mask_pre_hook):
        yield


class RoomyLayer(DynamicLayer):
    """A :class:`DynamicLayer` whose keys and values are the first tokens of longer buffers.

    Appending a token writes it into the buffers' next free slot instead of copying the whole
    layer (``DynamicLayer.update`` concatenates, which at 4k cached tokens is most of a CPU
    decoding step). The keys and values read are equal tensors either way, only their head
    stride differs. When the buffers are full, or the layer's states were replaced from outside
    (an eviction, a batch selection), it appends as a :class:`DynamicLayer` does.
    """

    key_buffer: torch.Tensor
    value_buffer: torch.Tensor

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states`` and ``value_states`` (B, H_kv, n, d); return the whole layer."""
        if not has_room(self, key_states.shape[-2]):
            return super().update(key_states, value_states, *args, **kwargs)
        length = self.keys.shape[-2]
        end = length + key_states.shape[-2]
        self.key_buffer[..., length:end, :].copy_(key_states)
        self.value_buffer[..., length:end, :].copy_(value_states)
        self.keys = self.key_buffer[..., :end, :]
        self.values = self.value_buffer[..., :end, :]
        return self.keys, self.values

    @staticmethod
    def in_buffer(states: torch.Tensor, buffer: torch.Tensor, end: int) -> bool:
        """Whether ``states`` are the first tokens of ``buffer`` and it holds ``end`` tokens."""
        return (
            states.data_ptr() == buffer.data_ptr()
            and states.shape[:2] == buffer.shape[:2]
            and states.stride() == buffer.stride()
            and end <= buffer.shape[-2]
        )


def with_room(states: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A buffer (B, H_kv, n + ``tokens``, d) starting with ``states`` (B, H_kv, n, d), and the
    view of ``states`` in it."""
    batch, heads, length, dim = states.shape
    buffer = states.new_empty(batch, heads, length + tokens, dim)
    buffer[..., :length, :].copy_(states)
    return buffer, buffer[..., :length, :]


def reserve_room(cache: Cache, tokens: int) -> None:
    """Give every filled plain :class:`DynamicLayer` of ``cache`` room for ``tokens`` more
    tokens (it becomes a :class:`RoomyLayer`, its other attributes kept), in place; a
    :class:`RoomyLayer` with too little room left gets new buffers. Other layers (quantized,
    sliding, empty) are left as they are."""
    for layer in cache.layers:
        if type(layer) not in (DynamicLayer, RoomyLayer) or layer.keys is None:
            continue
        if layer.keys.numel() == 0 or has_room(layer, tokens):
            continue
        layer.key_buffer, layer.keys = with_room(layer.keys, tokens)
        layer.value_buffer, layer.values = with_room(layer.values, tokens)
        layer.__class__ = RoomyLayer


def has_room(layer: DynamicLayer, tokens: int) -> bool:
    """Whether ``layer`` is a :class:`RoomyLayer` that can append ``tokens`` into its buffers."""
    if not isinstance(layer, RoomyLayer):
        return False
    end = layer.keys.shape[-2] + tokens
    return layer.in_buffer(layer.keys, layer.key_buffer, end) and layer.in_buffer(
        layer.values, layer.value_buffer, end
    )


def check_one_start(function: str, input_ids: Any, next_token_logits: Any) -> None:
    """Refuse a decoding call given both or neither of its two starts (the tokens to feed, or
    the prefill's last logits)."""
    if (input_ids is None) == (next_token_logits is None):
        raise ValueError(f"Pass exactly one of input_ids and next_token_logits to {function}.")


def append_tokens(
    generated: list[list[int]],
    alive: list[int],
    tokens: list[int],
    eos_token_ids: Sequence[int],
    max_new_tokens: int,
) -> list[int]:
    """Append each row's token to the ids generated for the cache behind it (``alive[row]``);
    return the rows that go on decoding (no stop token, fewer than ``max_new_tokens``)."""
    keep = []
    for row, (index, token) in enumerate(zip(alive, tokens, strict=True)):
        generated[index].append(token)
        if token not in eos_token_ids and len(generated[index]) < max_new_tokens:
            keep.append(row)
    return keep


@torch.inference_mode()
def greedy_generate(
    model: PreTrainedModel,
    cache: Cache,
    start_position: int,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    input_ids: torch.Tensor | None = None,
    next_token_logits: torch.Tensor | None = None,
) -> list[int]:
    """Greedy decoding that continues a (possibly compressed) cache.

    Parameters
    ----------
    model : PreTrainedModel
        The causal LM whose cache ``cache`` holds the prefilled prompt.
    cache : Cache
        The cache after prefill (compressed or not); extended in place.
    start_position : int
        Position of the next token in the uncompressed sequence (tokens seen so far).
    max_new_tokens : int
        Tokens to generate at most.
    eos_token_ids : Sequence[int]
        Generation stops after any of these (the stop token is returned).
    input_ids : torch.Tensor, optional
        (1, n) tokens to feed before generating, e.g. the question under the context-only
        protocol.
    next_token_logits : torch.Tensor, optional
        (vocab,) logits of the prefill's last position, when the whole prompt is in the cache.
        Exactly one of ``input_ids`` and ``next_token_logits`` is given.

    Returns
    -------
    list[int]
        The generated token ids.
    """
    check_one_start("greedy_generate", input_ids, next_token_logits)
    device = model.device
    generated: list[int] = []
    position = start_position
    reserve_room(cache, max_new_tokens + (0 if input_ids is None else input_ids.shape[1]))
    with per_layer_masks(model):
        while len(generated) < max_new_tokens:
            if input_ids is not None:
                n_new = input_ids.shape[1]
                positions = torch.arange(position, position + n_new, device=device).unsqueeze(0)
                next_token_logits = run_with_cache(
                    model,
                    input_ids.to(device),
                    cache,
                    position_ids=positions,
                    use_cache=True,
                    logits_to_keep=1,
                ).logits[0, -1]
                position += n_new
            token = int(next_token_logits.argmax())
            generated.append(token)
            if token in eos_token_ids:
                break
            input_ids = torch.tensor([[token]], device=device)
    return generated


# Lockstep decoding: the cells of one example decode one by one, interleaved layer by layer.

BATCH_FIRST_ARGUMENTS = ("attention_mask", "position_ids")  # per row; and the RoPE tables


def row_arguments(kwargs: dict, row: int, rows: int, cache: Cache) -> dict:
    """A decoder layer's keyword arguments for row ``row`` of a batch of ``rows``: its slice of
    every per-row tensor (one of batch 1 broadcasts, as is) and its own ``cache`` under the
    name the layer received a cache by."""
    names = [name for name in CACHE_ARGUMENTS if kwargs.get(name) is not None]
    if not names:
        raise mismatch(f"A decoder layer got no cache (its arguments: {', '.join(sorted(kwargs))})")
    arguments = {**kwargs, names[0]: cache}
    for name in BATCH_FIRST_ARGUMENTS:
        arguments[name] = row_of(kwargs.get(name), row, rows)
    tables = kwargs.get(POSITION_EMBEDDINGS_ARGUMENT)
    if tables is not None:
        arguments[POSITION_EMBEDDINGS_ARGUMENT] = tuple(row_of(t, row, rows) for t in tables)
    return arguments


def row_of(value, row: int, rows: int):
    """Row ``row`` of a tensor of ``rows`` rows; anything else (None, a tensor of one row that
    broadcasts) as it is."""
    if isinstance(value, torch.Tensor) and rows > 1 and value.shape[0] == rows:
        return value[row : row + 1]
    return value


def rows_forward(original):
    """A forward that runs ``original`` on every row of its input as a batch of 1."""

    def forward(states: torch.Tensor) -> torch.Tensor:
        return torch.cat([original(states[row : row + 1]) for row in range(states.shape[0])])

    return forward


def lockstep_layer_forward(layer: nn.Module, caches: list[Cache]):
    """A Llama-family decoder layer's forward over a batch of rows, row ``i`` on ``caches[i]``:
    the attention block (norm, attention) row by row as batch 1, the residual sums and the MLP
    block on the batch (their linear layers and norm patched to run row by row)."""

    def forward(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows = len(caches)
        attended = [
            layer.self_attn(
                hidden_states=layer.input_layernorm(hidden_states[row : row + 1]),
                **row_arguments(kwargs, row, rows, cache),
            )[0]
            for row, cache in enumerate(caches)
        ]
        hidden_states = hidden_states + torch.cat(attended)
        return hidden_states + layer.mlp(layer.post_attention_layernorm(hidden_states))

    return forward


VOCABULARY_BLOCK = 1024  # LM head rows per block: 2.4 MB of float32 at SmolLM2's width


def vocabulary_blocks_forward(head: nn.Linear):
    """An LM head's forward over a batch of rows that reads its weight in blocks of
    ``VOCABULARY_BLOCK`` vocabulary rows, computing every row's logits of a block while the
    block is in the CPU's cache (a 49152-row head does not fit there whole, so row-by-row
    products would read it from memory once per row).

    Each logit is the same dot product of one hidden state and one weight row either way; the
    first call checks that a blocked product equals the whole one bit for bit on this machine's
    kernels, and falls back to whole products row by row where it does not.
    """
    whole = rows_forward(head.forward)
    blocks_equal_whole: list[bool] = []

    def blocked(states: torch.Tensor) -> torch.Tensor:
        weight, bias = head.weight, head.bias
        rows = [states[row : row + 1] for row in range(states.shape[0])]
        logits = [[] for _ in rows]
        for start in range(0, weight.shape[0], VOCABULARY_BLOCK):
            block = weight[start : start + VOCABULARY_BLOCK]
            block_bias = None if bias is None else bias[start : start + VOCABULARY_BLOCK]
            for row_logits, row in zip(logits, rows, strict=True):
                row_logits.append(nn.functional.linear(row, block, block_bias))
        return torch.cat([torch.cat(row_logits, dim=-1) for row_logits in logits])

    def forward(states: torch.Tensor) -> torch.Tensor:
        if not blocks_equal_whole:
            first = states[:1]
            blocks_equal_whole.append(torch.equal(blocked(first), whole(first)))
        return (blocked if blocks_equal_whole[0] else whole)(states)

    return forward


@contextmanager
def row_by_row(model: PreTrainedModel, caches: list[Cache]) -> Iterator[None]:
    """While active, a forward of a batch computes every row as batch-1 decoding would, row
    ``i`` on ``caches[i]`` (a list the caller may shorten between forwards): every attention
    block runs one row at a time on its row's cache, every linear layer and norm runs each row
    as a batch of 1, one row after the other, and only elementwise operations (the embedding
    lookup, RoPE tables, activations, residual sums) run on the batch. A weight matrix is thus
    read for every row in turn while it is in the CPU's cache; the LM head, too large for the
    cache, block by block (:func:`vocabulary_blocks_forward`)."""
    stack = decoder(model)
    patched = {}
    for layer in stack.layers:
        patched[layer] = lockstep_layer_forward(layer, caches)
        patched[layer.post_attention_layernorm] = rows_forward(
            layer.post_attention_layernorm.forward
        )
        for module in layer.mlp.modules():
            if isinstance(module, nn.Linear):
                patched[module] = rows_forward(module.forward)
    patched[stack.norm] = rows_forward(stack.norm.forward)
    head = model.get_output_embeddings()
    patched[head] = (
        vocabulary_blocks_forward(head)
        if isinstance(head, nn.Linear)
        else rows_forward(head.forward)
    )
    own = {m: m.__dict__["forward"] for m in patched if "forward" in m.__dict__}
    try:
        for module, forward in patched.items():
            module.forward = forward
        yield
    finally:
        for module in patched:
            if module in own:
                module.forward = own[module]
            else:
                del module.forward


@torch.inference_mode()
def lockstep_greedy_generate(
    model: PreTrainedModel,
    caches: Sequence[Cache],
    start_position: int,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    input_ids: torch.Tensor | None = None,
    next_token_logits: torch.Tensor | None = None,
) -> list[list[int]]:
    """:func:`greedy_generate` of several caches of one prompt, bit for bit, but faster on a CPU.

    Each step feeds the caches still decoding as the rows of one batch, but every decoder
    layer, the final norm and the LM head run one row at a time (:func:`row_by_row`): each
    row's operations are those of batch-1 decoding on its own cache, so its tokens are those of
    :func:`greedy_generate` for that cache alone, while each layer's weights are read once per
    step for every cache instead of once per cache. A cache that emits a stop token leaves.
    Memory holds every cache at once.

    Returns
    -------
    list of list of int
        The generated token ids of each cache, in the order of ``caches``.
    """
    check_one_start("lockstep_greedy_generate", input_ids, next_token_logits)
    device = model.device
    extra = 0 if input_ids is None else input_ids.shape[1]
    for cache in caches:
        reserve_room(cache, max_new_tokens + extra)
    generated: list[list[int]] = [[] for _ in caches]
    alive = list(range(len(caches)))  # the cache behind each row
    rows = [caches[i] for i in alive]
    position = start_position
    logits = None if next_token_logits is None else [next_token_logits] * len(caches)
    with per_layer_masks(model), row_by_row(model, rows):
        while alive and max_new_tokens > 0:
            if input_ids is not None:
                n_new = input_ids.shape[1]
                positions = torch.arange(position, position + n_new, device=device)
                logits = run_with_cache(
                    model,
                    input_ids.to(device).expand(len(alive), -1),
                    rows[0],
                    position_ids=positions.expand(len(alive), -1),
                    use_cache=True,
                    logits_to_keep=1,
                ).logits[:, -1]
                position += n_new
            tokens = [int(row_logits.argmax()) for row_logits in logits]
            keep = append_tokens(generated, alive, tokens, eos_token_ids, max_new_tokens)
            alive = [alive[row] for row in keep]
            rows[:] = [caches[i] for i in alive]
            input_ids = torch.tensor([tokens[row] for row in keep], device=device).view(-1, 1)
    return generated


# Batched decoding: the cells of one example (one prompt, different kept sets) decode together.


def check_batchable(model: PreTrainedModel) -> None:
    """Raise if the model's attention cannot take the padding masks of a batch of caches."""
    implementation = model.config._attn_implementation
    if implementation not in ("sdpa", "eager"):
        raise ValueError(
            f"Batched decoding needs sdpa or eager attention (this model uses {implementation}, "
            "which takes no per-token mask); pass decode_batch=false or model.attn_implementation=sdpa."
        )


def padded_batch_cache(caches: Sequence[Cache]) -> tuple[DynamicCache, list[torch.Tensor]]:
    """One cache holding ``caches`` as rows of a batch, each layer right-padded to its longest.

    Layers may have different lengths within a cache (PyramidKV) and across caches.

    Returns
    -------
    tuple of (DynamicCache, list of torch.Tensor)
        The batch cache, and per layer the (C, L) mask of real (not padding) tokens.
    """
    batch = DynamicCache()
    valid = []
    for layer_idx in range(len(caches[0].layers)):
        layers = [cache.layers[layer_idx] for cache in caches]
        longest = max(layer.keys.shape[-2] for layer in layers)

        def padded(states: torch.Tensor, longest: int = longest) -> torch.Tensor:
            return F.pad(states, (0, 0, 0, longest - states.shape[-2]))

        keys = torch.cat([padded(layer.keys) for layer in layers])
        values = torch.cat([padded(layer.values) for layer in layers])
        lengths = torch.tensor([layer.keys.shape[-2] for layer in layers], device=keys.device)
        valid.append(torch.arange(longest, device=keys.device) < lengths.unsqueeze(1))
        batch.update(keys, values, layer_idx)
    return batch, valid


def padding_mask(
    valid: torch.Tensor, new_length: int, attn_implementation: str, dtype: torch.dtype
) -> torch.Tensor:
    """Mask (C, 1, n, L + n) of ``n`` new tokens over a padded cache (``valid``: (C, L)) plus
    themselves: real cached tokens and earlier new tokens are visible, padding never is."""
    rows, cached = valid.shape
    new = torch.ones(new_length, new_length, dtype=torch.bool, device=valid.device).tril_()
    allowed = torch.cat(
        [valid.unsqueeze(1).expand(rows, new_length, cached), new.expand(rows, -1, -1)], dim=-1
    ).unsqueeze(1)
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


@contextmanager
def padding_masks(model: PreTrainedModel, valid: list[torch.Tensor]) -> Iterator[None]:
    """While active, attention layer ``l`` masks the padding of ``valid[l]`` (extended in place
    by the tokens each forward appends, so the list always describes the cache)."""

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        layer_idx = module.layer_idx
        cached_length = layer_cache(module, kwargs).get_seq_length(layer_idx)
        if cached_length != valid[layer_idx].shape[1]:
            raise RuntimeError(
                f"Layer {layer_idx} holds {cached_length} cached tokens but its padding mask "
                f"{valid[layer_idx].shape[1]}: the batch cache changed outside batched decoding."
            )
        hidden_states = hidden_states_of(args, kwargs)
        new_length = hidden_states.shape[1]
        kwargs["attention_mask"] = padding_mask(
            valid[layer_idx],
            new_length,
            module.config._attn_implementation,
            hidden_states.dtype,
        )
        appended = valid[layer_idx].new_ones(valid[layer_idx].shape[0], new_length)
        valid[layer_idx] = torch.cat([valid[layer_idx], appended], dim=1)
        return args, kwargs

    with forward_hooks(attention_layers(model), pre=pre_hook):
        yield


@torch.inference_mode()
def batched_greedy_generate(
    model: PreTrainedModel,
    caches: Sequence[Cache],
    start_position: int,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    input_ids: torch.Tensor | None = None,
    next_token_logits: torch.Tensor | None = None,
) -> list[list[int]]:
    """:func:`greedy_generate` for several caches of one prompt at once, as one padded batch.

    Every cache continues the same prompt (same ``start_position``, same ``input_ids`` or
    ``next_token_logits``) from its own kept tokens; per layer the caches are right-padded to the
    longest and the padding masked. A row that emits a stop token leaves the batch. The tokens
    equal :func:`greedy_generate`'s for each cache alone up to floating-point rounding (a batch
    reduces in another order), which can flip a greedy choice at a near-tie.

    Returns
    -------
    list of list of int
        The generated token ids of each cache, in the order of ``caches``.
    """
    check_one_start("batched_greedy_generate", input_ids, next_token_logits)
    check_batchable(model)
    if max_new_tokens < 1:
        return [[] for _ in caches]
    device = model.device
    cache, valid = padded_batch_cache(caches)
    generated: list[list[int]] = [[] for _ in caches]
    alive = list(range(len(caches)))  # the cache behind each row of the batch
    position = start_position
    if next_token_logits is not None:
        next_token_logits = next_token_logits.view(1, -1).expand(len(caches), -1)
    else:
        input_ids = input_ids.to(device).expand(len(caches), -1)
    with padding_masks(model, valid):
        while alive:
            if input_ids is not None:
                n_new = input_ids.shape[1]
                positions = torch.arange(position, position + n_new, device=device)
                next_token_logits = run_with_cache(
                    model,
                    input_ids,
                    cache,
                    position_ids=positions.expand(len(alive), -1),
                    use_cache=True,
                    logits_to_keep=1,
                ).logits[:, -1]
                position += n_new
            tokens = next_token_logits.argmax(dim=-1).tolist()
            keep = append_tokens(generated, alive, tokens, eos_token_ids, max_new_tokens)
            if len(keep) < len(alive):
                rows = torch.tensor(keep, device=device, dtype=torch.long)
                cache.batch_select_indices(rows)
                valid[:] = [mask[rows] for mask in valid]
                alive = [alive[row] for row in keep]
                tokens = [tokens[row] for row in keep]
            input_ids = torch.tensor(tokens, device=device).view(-1, 1)
    return generated
