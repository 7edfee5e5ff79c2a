"""The prefill state of one attention layer, as a method sees it."""

from __future__ import annotations

from dataclasses import dataclass

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
class LayerPrefill:
    """Everything a method may read about one layer at the end of the prefill.

    Attributes
    ----------
    module : nn.Module
        The attention module (its projections, ``head_dim``, ``scaling``, ``layer_idx``).
    rotary_emb : nn.Module
        The model's rotary embedding, for positions beyond the prompt.
    num_layers : int
        Number of decoder layers of the model.
    hidden_states : torch.Tensor
        Hidden states entering attention, (B, T, D).
    keys, values : torch.Tensor
        The full cached keys (after RoPE) and values, (B, H_kv, T, d).
    cos, sin : torch.Tensor
        RoPE tables of the prompt positions, (B, T, d).
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

    @property
    def layer_idx(self) -> int:
        return self.module.layer_idx

    @property
    def prompt_length(self) -> int:
        return self.keys.shape[2]

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
        """Post-RoPE queries (B, H, n, d) of prompt positions ``start:end``."""
        end = self.prompt_length if end is None else end
        queries = self.project_queries(self.hidden_states[:, start:end])
        return apply_rope(queries, self.cos[:, start:end], self.sin[:, start:end])

    def grouped(self, per_query_head: torch.Tensor) -> torch.Tensor:
        """View (B, H, ...) as (B, H_kv, G, ...): query heads grouped by their KV head."""
        bsz = per_query_head.shape[0]
        return per_query_head.view(
            bsz, self.num_kv_heads, self.group_size, *per_query_head.shape[2:]
        )
