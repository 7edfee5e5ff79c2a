"""What a kept set retains, measured beside task scores (CapKV's objective and attention error).

For every cell of a sweep and every layer (in streaming mode, every compression of every layer,
capacity only):

- **capacity fraction**: the log-det capacity ``1/2 logdet(I + sum_{i in C} w_i v_i v_i^T)`` of the
  kept set C over that of the whole prompt, with CapKV's relevance weights ``w`` (default
  hyperparameters), averaged over query heads, KV heads and layers. CapKV maximises it by
  construction; the question is how much of it the other methods keep and how it tracks scores.
- **attention error**: ``||o_C - o_full|| / ||o_full||``, the relative error of the attention
  output of the decoding queries (the first token fed after the prefill: the first generated
  token under query_aware, the question under context_only) when attending over the kept tokens
  instead of the full cache, with the queries of the full-cache forward, averaged over layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn
from transformers import Cache, PreTrainedModel

from capkv.cap import CapKV
from capkv.capacity import log_det_capacity
from capkv.engine.allocation import kept_mask
from capkv.engine.compression import CompressionRecord, gather_tokens
from capkv.engine.hooks import (
    attention_layers,
    crop_cache,
    forward_hooks,
    hidden_states_of,
    position_embeddings,
    run_with_cache,
)
from capkv.engine.layer import LayerPrefill, StreamMemory, apply_rope, project_queries


class CapacityProbe:
    """Accumulates each cell's retained capacity fraction, layer by layer, during a prefill.

    Pass :meth:`on_layer` as the ``on_layer`` callback of :func:`capkv.engine.compression.record_kept`; in
    streaming mode :class:`capkv.engine.streaming.Streamer` calls :meth:`on_compression` instead.
    """

    def __init__(self, n_cells: int, reference: CapKV | None = None) -> None:
        self.reference = reference or CapKV()
        self.fractions: list[list[float]] = [[] for _ in range(n_cells)]
        self.anchors: dict[int, StreamMemory] = {}  # streaming: the query anchor's sums per layer

    def on_layer(self, state: LayerPrefill, kept: Sequence[torch.Tensor | None]) -> None:
        weights = self.reference.relevance_weights(state)  # (B, H_kv, G, T)
        values = state.values.unsqueeze(2).expand(-1, -1, weights.shape[2], -1, -1)
        full = log_det_capacity(values, weights)
        for fractions, indices in zip(self.fractions, kept, strict=True):
            if indices is None:
                fractions.append(1.0)
                continue
            indices = indices.unsqueeze(2).expand(-1, -1, weights.shape[2], -1)
            fractions.append(float((log_det_capacity(values, weights, indices) / full).mean()))

    def on_compression(self, state: LayerPrefill, kept: torch.Tensor | None) -> None:
        """Streaming (one cell): the fraction of the cache's capacity one compression keeps,
        recorded when it evicts (``kept`` not None). The relevance weights use the reference's
        own running query anchor over every token read (as a streaming CapKV's), whatever the
        method evicting, so every method is measured against the same weights."""
        layer_idx = state.module.layer_idx
        probed = replace(state, memory=self.anchors.get(layer_idx))
        if kept is not None:
            self.on_layer(probed, [kept])
        self.anchors[layer_idx] = self.reference.remember(probed, scores=None)

    def mean(self, cell: int) -> float:
        """The mean fraction over a cell's layers (and compressions); 1.0 when nothing was
        evicted."""
        fractions = self.fractions[cell]
        return sum(fractions) / len(fractions) if fractions else 1.0


@torch.inference_mode()
def decoding_queries(
    model: PreTrainedModel, full_cache: Cache, input_ids: torch.Tensor, start_position: int
) -> list[torch.Tensor]:
    """Post-RoPE queries (B, H, n, d) of ``input_ids`` fed after the prefill, per layer, from
    the full cache; the cache is cropped back afterwards."""
    layers = attention_layers(model)
    queries: list[torch.Tensor] = [None] * len(layers)
    prompt_length = full_cache.get_seq_length()

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        projected = project_queries(module, hidden_states_of(args, kwargs))
        cos, sin = position_embeddings(module, kwargs)
        queries[module.layer_idx] = apply_rope(projected, cos, sin)

    positions = torch.arange(start_position, start_position + input_ids.shape[1])
    try:
        with forward_hooks(layers, pre=capture):
            run_with_cache(
                model,
                input_ids.to(model.device),
                full_cache,
                position_ids=positions.unsqueeze(0).to(model.device),
                logits_to_keep=1,
            )
    finally:
        crop_cache(full_cache, prompt_length)
    return queries


def _attend(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    present: torch.Tensor | None = None,
):
    """Attention output (B, H_kv, G, n, d) of grouped queries over the given keys; ``present``
    (B, H_kv, n_keys) hides padding slots of heads that keep fewer tokens."""
    logits = (queries @ keys.unsqueeze(2).transpose(-1, -2)) * scaling
    if present is not None:
        logits = logits.masked_fill(~present[:, :, None, None, :], float("-inf"))
    return logits.softmax(dim=-1) @ values.unsqueeze(2)


@torch.inference_mode()
def attention_errors(
    model: PreTrainedModel,
    full_cache: Cache,
    queries: list[torch.Tensor],
    records: Sequence[CompressionRecord],
) -> list[float]:
    """Relative attention-output error of every record's kept set, averaged over layers."""
    errors = [[] for _ in records]
    for layer_idx, module in enumerate(attention_layers(model)):
        keys = full_cache.layers[layer_idx].keys[..., : records[0].prompt_length, :].float()
        values = full_cache.layers[layer_idx].values[..., : records[0].prompt_length, :].float()
        bsz, n_kv = keys.shape[:2]
        grouped = queries[layer_idx].float().view(bsz, n_kv, -1, *queries[layer_idx].shape[2:])
        full = _attend(grouped, keys, values, module.scaling)
        for layer_errors, record in zip(errors, records, strict=True):
            if layer_idx not in record.kept:
                layer_errors.append(0.0)
                continue
            kept = record.kept[layer_idx]
            output = _attend(
                grouped,
                gather_tokens(keys, kept),
                gather_tokens(values, kept),
                module.scaling,
                kept_mask(kept),
            )
            layer_errors.append(float((output - full).norm() / full.norm()))
    return [sum(e) / len(e) for e in errors]
