"""The prefill state of one attention layer, as a method sees it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def apply_rope(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``states`` (B, H, n, d) by RoPE with ``cos``/``sin`` of shape (B, n, d)."""
    half = states.shape[-1] // 2
    rotated = torch.cat((-states[..., half:], states[..., :half]), dim=-1)
    return states * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def project_queries(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE queries (B, H, n, d) of ``hidden_states`` (B, n, D), with QK-norm if any."""
    bsz, n, _ = hidden_states.shape
    queries = module.q_proj(hidden_states).view(bsz, n, -1, module.head_dim).transpose(1, 2)
    q_norm = getattr(module, "q_norm", None)
    return q_norm(queries) if q_norm is not None else queries


@dataclass
class StreamMemory:
    """What a method carries from one compression of a layer to the next in streaming mode
    (:mod:`capkv.engine.streaming`): empty at a layer's first compression.

    Attributes
    ----------
    per_token : dict[str, torch.Tensor]
        Statistics of the cached tokens, (B, H_kv, L) each (H2O's accumulated attention); the
        engine gathers them with the tokens it keeps, so an evicted token leaves them.
    totals : dict[str, Any]
        Statistics of every token read so far, kept whole (CapKV's sum of queries).
    """

    per_token: dict[str, torch.Tensor] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerPrefill:
    """Everything a method may read about one layer when its cache is compressed.

    At the end of a prefill (the paper's setting) the cache holds the whole prompt and every
    token's hidden states are observed. In streaming mode (:mod:`capkv.engine.streaming`) the cache
    holds the tokens kept so far followed by the tokens read since the last compression: the
    hidden states are those of the cache's last tokens only (:attr:`hidden_states` covers the
    last ``Q`` cached tokens, the ``new_tokens`` newest of them not yet seen by a compression),
    ``seen`` counts every token read, and ``memory`` holds what the method carried over.

    Attributes
    ----------
    module : nn.Module
        The attention module (its projections, ``head_dim``, ``scaling``, ``layer_idx``).
    rotary_emb : nn.Module
        The model's rotary embedding, for positions beyond the prompt.
    num_layers : int
        Number of decoder layers of the model.
    hidden_states : torch.Tensor
        Hidden states entering attention of the last ``Q`` cached tokens, (B, Q, D); ``Q = T``
        at the end of a prefill.
    keys, values : torch.Tensor
        The cached keys (after RoPE) and values, (B, H_kv, T, d), in the order of their
        positions.
    cos, sin : torch.Tensor
        RoPE tables of the positions of the hidden states, (B, Q, d).
    attentions : torch.Tensor or None
        The attention weights the layer returned, (B, H, T, T): only eager attention returns
        them (None otherwise). Our methods never read them; kvpress presses that score from
        attention weights do (:mod:`capkv.interop`).
    """

    module: nn.Module
    rotary_emb: nn.Module
    num_layers: int
    hidden_states: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    attentions: torch.Tensor | None = None
    new_tokens: int | None = None
    seen: int | None = None
    memory: StreamMemory | None = None

    @property
    def layer_idx(self) -> int:
        return self.module.layer_idx

    @property
    def prompt_length(self) -> int:
        return self.keys.shape[2]

    @property
    def observed(self) -> int:
        """Cached tokens whose hidden states are observed (the last ones of the cache)."""
        return self.hidden_states.shape[1]

    @property
    def query_offset(self) -> int:
        """Cache index of the first observed token (0 at the end of a prefill)."""
        return self.prompt_length - self.observed

    @property
    def num_new(self) -> int:
        """Observed tokens not yet seen by a compression (the last ones)."""
        return self.observed if self.new_tokens is None else self.new_tokens

    @property
    def next_position(self) -> int:
        """Position of the next token: every token read so far."""
        return self.prompt_length if self.seen is None else self.seen

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[3]

    @property
    def num_heads(self) -> int:
        return self.module.config.num_attention_heads

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA); 1 for plain multi-head attention."""
        return self.num_heads // self.num_kv_heads

    def project_queries(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE queries (B, H, n, d) of ``hidden_states`` (B, n, D), with QK-norm if any."""
        return project_queries(self.module, hidden_states)

    def queries(self, start: int, end: int | None = None) -> torch.Tensor:
        """Post-RoPE queries (B, H, n, d) of the cached tokens ``start:end`` (cache indices,
        which are prompt positions at the end of a prefill); only observed tokens have them."""
        end = self.prompt_length if end is None else end
        offset = self.query_offset
        if start < offset:
            raise ValueError(
                f"Queries of cached tokens {start}:{end} were asked, but only the last "
                f"{self.observed} of {self.prompt_length} are observed in this compression: a "
                "streaming method reads queries of recent tokens only."
            )
        start, end = start - offset, end - offset
        queries = self.project_queries(self.hidden_states[:, start:end])
        return apply_rope(queries, self.cos[:, start:end], self.sin[:, start:end])

    def grouped(self, per_query_head: torch.Tensor) -> torch.Tensor:
        """View (B, H, ...) as (B, H_kv, G, ...): query heads grouped by their KV head."""
        bsz = per_query_head.shape[0]
        return per_query_head.view(
            bsz, self.num_kv_heads, self.group_size, *per_query_head.shape[2:]
        )
