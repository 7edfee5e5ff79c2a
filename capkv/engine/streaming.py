"""Eviction while the cache grows: a prompt read in chunks and generation under a fixed bound.

Prefill-time eviction (:func:`capkv.engine.compression.evict`) compresses once, after the whole prompt, so
the cache peaks at the full prompt and grows by one token per generated token. Inside
:func:`streamed` every layer's cache is compressed back to the bound ``N`` after each chunk of
``C`` prompt tokens and every ``K`` generated tokens (``compress_every``), so no KV head ever
holds more than ``N + max(C, K)`` tokens. PyramidKV's layers hold their own budgets, its
schedule for the tokens read so far (which averages ``N``; the lowest layer keeps up to
``2 (N - window) - (N - window) // beta + window``). A compression sees the layer's cache (the tokens kept so far, then the tokens
read since the last compression) with the hidden states of the newest tokens
(:class:`capkv.engine.layer.LayerPrefill`), and the method's memory of earlier compressions
(:meth:`capkv.engine.method.EvictionMethod.remember`). Each method's policy in this setting:

- StreamingLLM: its sinks and the most recent tokens, a rolling window;
- H2O: the attention every query read so far paid to each cached token, accumulated online
  (each compression adds its new queries' attention; an evicted token leaves the tally);
- SnapKV, PyramidKV: the last ``window`` tokens read are the observation window (always kept,
  so their hidden states stay at hand);
- CapKV: ridge leverage against the tokens now cached; the query anchor is the mean over every
  query read so far (sinks excluded), rotated by the RoPE of the ``n_future`` positions after the
  last token read.

Positions stay the original ones: a token keeps the RoPE rotation of where it was read, and
reading stops at the model's position limit. With a single chunk and no generation-time
compression this is prefill-time eviction exactly (the same scores, the same kept tokens):
both modes are this one mechanism. Streaming decides each cell's cache as it goes, so a sweep
reads the prompt once per cell (no shared prefill), and only ``allocation=uniform`` streams.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from transformers import Cache, DynamicCache, PreTrainedModel

from capkv.engine.budget import Budget
from capkv.engine.compression import CompressionRecord, gather_tokens, resolve_budget
from capkv.engine.decoding import per_layer_masks
from capkv.engine.hooks import (
    attention_layers,
    forward_hooks,
    hidden_states_of,
    layer_cache,
    position_embeddings,
    rotary_embedding,
    run_with_cache,
)
from capkv.engine.layer import LayerPrefill, StreamMemory
from capkv.engine.method import EvictionMethod
from capkv.models import check_supported


class CompressionObserver(Protocol):
    """What watches each compression of a stream (e.g. :class:`capkv.analysis.diagnostics.
    CapacityProbe`, which measures the capacity each one keeps): told the layer's state and the
    kept indices, None when the compression evicted nothing."""

    def on_compression(self, state: LayerPrefill, kept: torch.Tensor | None) -> None: ...


@dataclass(frozen=True)
class StreamSettings:
    """How a cell reads its prompt and bounds its cache while generating.

    Parameters
    ----------
    chunk : int, optional
        Prompt tokens per forward, each chunk followed by a compression (None: the whole prompt
        in one forward, as prefill-time eviction).
    compress_every : int, optional
        Generated tokens between compressions (None: the cache grows while generating).
    """

    chunk: int | None = None
    compress_every: int | None = None

    def __post_init__(self) -> None:
        for name in ("chunk", "compress_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be a whole number of tokens, got {value!r}.")
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 token, got {value}.")

    @property
    def active(self) -> bool:
        """Whether anything is compressed beyond the one prefill-time compression."""
        return self.chunk is not None or self.compress_every is not None

    @property
    def label(self) -> str:
        """Suffix of a streaming cell's folder and method label, e.g. ``chunk512-every64``."""
        parts = []
        if self.chunk is not None:
            parts.append(f"chunk{self.chunk}")
        if self.compress_every is not None:
            parts.append(f"every{self.compress_every}")
        return "-".join(parts)


@dataclass
class StreamRecord(CompressionRecord):
    """What a streaming pass held: a :class:`CompressionRecord` of the cache's latest kept
    tokens (original positions, per layer and KV head), and the peak.

    Attributes
    ----------
    peak_per_layer : list[int]
        The most tokens any KV head of each layer held at once (just before a compression).
    compressions : int
        Compressions of every layer (prompt chunks and generation steps).
    """

    peak_per_layer: list[int] = field(default_factory=list)
    compressions: int = 0


@dataclass
class LayerStream:
    """One layer's streaming state between compressions."""

    hidden_states: torch.Tensor | None = None  # observed tokens, the last of the cache
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    pending: int = 0  # tokens read since the last compression
    seen: int = 0  # tokens read so far
    positions: torch.Tensor | None = None  # (B, H_kv, L) original positions of cached tokens
    memory: StreamMemory | None = None

    def observe(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Add the hidden states and RoPE tables of the tokens a forward appended."""
        if self.hidden_states is None:
            self.hidden_states, self.cos, self.sin = hidden_states, cos, sin
        else:
            self.hidden_states = torch.cat([self.hidden_states, hidden_states], dim=1)
            self.cos = torch.cat([self.cos, cos], dim=1)
            self.sin = torch.cat([self.sin, sin], dim=1)

    def keep_last(self, count: int) -> None:
        """Forget the hidden states of all but the last ``count`` observed tokens."""
        if self.hidden_states is None:
            return
        start = max(0, self.hidden_states.shape[1] - count)
        self.hidden_states = self.hidden_states[:, start:]
        self.cos, self.sin = self.cos[:, start:], self.sin[:, start:]


class Streamer:
    """Reads a prompt in chunks and keeps every layer's cache within the bound; made by
    :func:`streamed`, whose hooks call :meth:`after_layer`."""

    def __init__(
        self,
        model: PreTrainedModel,
        method: EvictionMethod,
        budget: Budget | None,
        settings: StreamSettings,
        probe: CompressionObserver | None = None,
    ) -> None:
        self.model = model
        self.probe = probe
        self.method = method
        self.budget = budget
        self.settings = settings
        self.layers_modules = attention_layers(model)
        self.rotary_emb = rotary_embedding(model)
        num_layers = len(self.layers_modules)
        self.record = StreamRecord(num_layers=num_layers, peak_per_layer=[0] * num_layers)
        self.layers = [LayerStream() for _ in range(num_layers)]
        self.bound: Budget | None = None  # the budget in tokens, fixed by the prompt's length
        self.reading = False  # a prompt chunk is being fed: compress after it
        self.evicts = budget is not None and method.evicts

    @property
    def lookback(self) -> int:
        """Observed tokens kept between compressions: the method's always-kept last tokens
        (SnapKV's observation window), whose hidden states a compression may read again."""
        return self.method.protected(prompt_length=10**9)[1] if self.evicts else 0

    def fix_bound(self, prompt_length: int) -> None:
        """The bound in tokens per KV head: the budget's tokens (however long the text grows),
        or the ratio's share of the prompt's length."""
        if self.evicts:
            tokens = self.budget.tokens
            self.bound = Budget(tokens=tokens or max(1, self.budget.n_kept(prompt_length)))

    def after_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Observe the tokens a forward appended to one layer; compress it when due."""
        layer_idx = module.layer_idx
        hidden_states = hidden_states_of(args, kwargs)
        cache_layer = layer_cache(module, kwargs).layers[layer_idx]
        state = self.layers[layer_idx]
        new = hidden_states.shape[1]
        state.seen += new
        state.pending += new
        length = cache_layer.keys.shape[2]
        self.record.peak_per_layer[layer_idx] = max(self.record.peak_per_layer[layer_idx], length)
        if not self.evicts:
            return
        every = self.settings.compress_every
        if not self.reading and every is None:
            return  # nothing will be compressed before the end: keep no hidden states
        cos, sin = position_embeddings(module, kwargs)
        state.observe(hidden_states, cos, sin)
        new_positions = torch.arange(state.seen - new, state.seen, device=cache_layer.keys.device)
        new_positions = new_positions.expand(*cache_layer.keys.shape[:2], new)
        state.positions = (
            new_positions
            if state.positions is None
            else torch.cat([state.positions, new_positions], dim=-1)
        )
        if self.reading or state.pending >= every:
            self.compress(module, cache_layer, state)

    def compress(self, module: nn.Module, cache_layer, state: LayerStream) -> None:
        """Compress one layer's cache back to the bound and carry the method's memory over."""
        layer = LayerPrefill(
            module=module,
            rotary_emb=self.rotary_emb,
            num_layers=len(self.layers),
            hidden_states=state.hidden_states,
            keys=cache_layer.keys,
            values=cache_layer.values,
            cos=state.cos,
            sin=state.sin,
            new_tokens=state.pending,
            seen=state.seen,
            memory=state.memory,
        )
        with torch.no_grad():
            scores = self.method.score(layer)
            memory = self.method.remember(layer, scores)
            kept = self.method.kept_indices(layer, self.bound, scores=scores)
            if self.probe is not None:
                self.probe.on_compression(layer, kept)
        if kept is not None:
            cache_layer.keys = gather_tokens(cache_layer.keys, kept)
            cache_layer.values = gather_tokens(cache_layer.values, kept)
            memory.per_token = {
                name: stat.gather(-1, kept) for name, stat in memory.per_token.items()
            }
            state.positions = state.positions.gather(-1, kept)
        self.record.kept[module.layer_idx] = state.positions
        state.memory = memory
        state.pending = 0
        state.keep_last(min(self.lookback, cache_layer.keys.shape[2]))
        if module.layer_idx == len(self.layers) - 1:
            self.record.compressions += 1

    @torch.inference_mode()
    def prefill(
        self, input_ids: torch.Tensor, cache: Cache, all_logits: bool = False
    ) -> torch.Tensor:
        """Feed ``input_ids`` (1, T) into an empty ``cache`` in chunks, compressing after each.

        Returns the logits of the last position (vocab,), or with ``all_logits`` those of every
        position (T, vocab) in float32 (memory ``T x vocab``: :func:`read_text` takes the log
        probabilities chunk by chunk instead).
        """
        logits = [logit for logit in self.read(input_ids, cache, all_logits)]
        return torch.cat(logits) if all_logits else logits[-1][-1]

    def read(self, input_ids: torch.Tensor, cache: Cache, all_logits: bool) -> Iterator:
        """Yield each chunk's logits (chunk, vocab) (its last position's alone unless
        ``all_logits``) after feeding it and compressing every layer. Call it under
        ``torch.inference_mode()`` (as :meth:`prefill` and :func:`read_text` do): a generator
        does not inherit its caller's decorator."""
        prompt_length = input_ids.shape[1]
        if cache.get_seq_length() != 0:
            raise ValueError("Streaming reads a prompt into a new, empty DynamicCache.")
        self.fix_bound(prompt_length)
        self.record.prompt_length = prompt_length
        chunk = self.settings.chunk or prompt_length
        device = self.model.device
        for start in range(0, prompt_length, chunk):
            end = min(start + chunk, prompt_length)
            positions = torch.arange(start, end, device=device).unsqueeze(0)
            self.reading = True
            try:
                outputs = run_with_cache(
                    self.model,
                    input_ids[:, start:end].to(device),
                    cache,
                    position_ids=positions,
                    use_cache=True,
                    logits_to_keep=0 if all_logits else 1,
                )
            finally:
                self.reading = False
            yield outputs.logits[0].float()


@contextmanager
def streamed(
    model: PreTrainedModel,
    method: EvictionMethod,
    budget: Budget | int | None = None,
    ratio: float | None = None,
    settings: StreamSettings | None = None,
    probe: CompressionObserver | None = None,
) -> Iterator[Streamer]:
    """Streaming eviction: read a prompt with :meth:`Streamer.prefill` and decode inside this
    context (:func:`capkv.engine.decoding.greedy_generate`), the cache bounded throughout.

    Parameters
    ----------
    model : PreTrainedModel
        A Llama-family causal LM.
    method : EvictionMethod
        Which tokens to keep; ``allocation=uniform`` only.
    budget, ratio
        The bound, as for :func:`capkv.engine.compression.evict`: tokens per KV head, or the fraction of the
        prompt removed (fixed once the prompt's length is known).
    settings : StreamSettings
        Chunk of the prompt per forward and generated tokens between compressions.
    probe : CompressionObserver, optional
        Measures the capacity fraction every compression retains
        (:meth:`capkv.analysis.diagnostics.CapacityProbe.on_compression`).

    Yields
    ------
    Streamer
        Its :meth:`~Streamer.prefill` reads the prompt; its ``record`` says what was kept.
    """
    check_supported(model)
    check_streamable(method)
    resolved = resolve_budget(method, budget, ratio)
    streamer = Streamer(model, method, resolved, settings or StreamSettings(), probe)

    def post(module: nn.Module, args: tuple, kwargs: dict, output):
        streamer.after_layer(module, args, kwargs)
        return output

    with forward_hooks(streamer.layers_modules, post=post), per_layer_masks(model):
        yield streamer


def check_streamable(method: EvictionMethod) -> None:
    """Refuse a method that cannot compress a growing cache."""
    refusal = getattr(method, "streaming_refusal", None)  # kvpress presses (capkv.interop)
    if refusal:
        raise ValueError(f"{refusal}; run it without chunk= and compress_every=.")
    if method.allocation != "uniform":
        raise ValueError(
            f"allocation={method.allocation} does not stream (each compression would pad heads "
            "to different lengths); use method.allocation=uniform with chunk= or compress_every=."
        )


def check_positions(model: PreTrainedModel, prompt_tokens: int, new_tokens: int = 0) -> None:
    """Refuse a text that would pass the model's position limit: streaming keeps every token's
    original position, so a bounded cache does not let a model read further than it was trained
    to."""
    limit = model.config.max_position_embeddings
    if prompt_tokens + new_tokens > limit:
        generated = f" and {new_tokens} new ones" if new_tokens else ""
        raise ValueError(
            f"{prompt_tokens} tokens{generated} pass the model's position limit of {limit} "
            "(streaming keeps the original positions): read a shorter text"
            + (" or generate fewer tokens." if new_tokens else ".")
        )


@torch.inference_mode()
def read_text(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    method: EvictionMethod,
    budget: Budget | None,
    chunk: int,
    probe: CompressionObserver | None = None,
) -> tuple[torch.Tensor, StreamRecord]:
    """Negative log-likelihood of every next token of a text read in chunks under a bound.

    Parameters
    ----------
    model : PreTrainedModel
        A Llama-family causal LM.
    input_ids : torch.Tensor
        (1, T) token ids, ``T`` at most the model's position limit.
    method : EvictionMethod
        Which tokens to keep (the full cache reads the text in the same chunks).
    budget : Budget or None
        The bound (None for a method that does not evict); a ratio is of ``T``.
    chunk : int
        Tokens per forward; the cache is compressed after each.
    probe : CompressionObserver, optional
        Measures the capacity fraction every compression retains.

    Returns
    -------
    tuple of (torch.Tensor, StreamRecord)
        (T - 1,) float32 NLL in nats of tokens ``1..T-1``, each given what the cache held of
        the tokens before it; and what the pass kept and its peak.
    """
    check_positions(model, input_ids.shape[1])
    targets = input_ids[0, 1:].to(model.device)
    losses = []
    cache = DynamicCache()
    settings = StreamSettings(chunk=chunk)
    with streamed(model, method, budget, settings=settings, probe=probe) as streamer:
        start = 0
        for logits in streamer.read(input_ids, cache, all_logits=True):
            end = start + logits.shape[0]
            predicted = logits[: targets.shape[0] - start]
            log_probs = torch.log_softmax(predicted, dim=-1)
            losses.append(-log_probs.gather(-1, targets[start:end].unsqueeze(-1)).squeeze(-1))
            start = end
    return torch.cat(losses), streamer.record
