"""H2O: heavy hitters by attention accumulated over the whole prompt, plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from capkv.engine.attention import accumulated_attention
from capkv.engine.layer import LayerPrefill, StreamMemory
from capkv.engine.method import EvictionMethod

TALLY = "attention"  # the accumulated attention a streaming H2O carries between compressions


@dataclass
class H2O(EvictionMethod):
    """H2O (Zhang et al. 2023, arXiv 2306.14048), in the one-shot prefill form of the
    KV-eviction benchmarks.

    Each key's score is the attention it receives, summed over every prompt query (causal
    softmax over the full prompt), averaged over the query heads of its KV head; the top
    ``budget - window`` non-window tokens are kept with the last ``window`` tokens. The
    original evicts one token per decoding step; this is its prefill analogue. On CUDA with
    Triton a fused kernel streams queries and keys in tiles (memory ``O(T)`` per head);
    elsewhere queries are processed in chunks, so memory grows as ``chunk x T``, never
    ``T x T`` (:func:`capkv.engine.attention.accumulated_attention`). No attention weights are asked of
    the model (sdpa and flash-attention keep working).

    In streaming mode (:mod:`capkv.engine.streaming`) the score is the paper's online one: every
    compression adds the attention its new queries (a prompt chunk, or the tokens generated
    since the last compression) paid to the cached tokens to the tally carried over, and a token
    evicted leaves the tally.

    Parameters
    ----------
    window : int
        Recent tokens always kept.
    chunk : int
        Queries per chunk of the PyTorch path (memory versus speed only).
    allocation, floor
        See :class:`~capkv.engine.method.EvictionMethod`. Under ``allocation=adaptive`` the scores of
        all KV heads are ranked together as they are: each is attention mass summed over the
        same prompt queries, and every head gives each query a mass of 1 (Ada-KV's choice).
    """

    comparable_across_heads: ClassVar[str | None] = (
        "attention mass summed over the same queries, a mass of 1 per query in every head"
    )

    window: int = 32
    chunk: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 0:
            raise ValueError(f"H2O window must be >= 0, got {self.window}.")
        if self.chunk < 1:
            raise ValueError(f"H2O chunk must be >= 1 query, got {self.chunk}.")

    def protected(self, prompt_length: int) -> tuple[int, int]:
        return 0, self.window

    def score(self, layer: LayerPrefill) -> torch.Tensor:
        received = accumulated_attention(layer, self.chunk)
        earlier = layer.memory.per_token.get(TALLY) if layer.memory is not None else None
        if earlier is not None:  # streaming: the tally of the tokens still cached
            received[..., : earlier.shape[-1]] += earlier
        return received

    def remember(self, layer: LayerPrefill, scores: torch.Tensor) -> StreamMemory:
        return StreamMemory(per_token={TALLY: scores})
