"""Attention that prompt queries give to cached keys, recomputed without a T x T matrix."""

from __future__ import annotations

import torch

from capkv.layer import LayerPrefill


def received_attention(layer: LayerPrefill, query_start: int, query_end: int) -> torch.Tensor:
    """Attention each key receives from prompt queries ``query_start:query_end``, summed.

    The causal softmax runs in float32 over the keys up to the last query, so memory is
    ``(query_end - query_start) x query_end`` per query head. Probabilities are never written
    out: the exponentials are summed against the inverse row normalisers in one product.

    Returns
    -------
    torch.Tensor
        (B, H_kv, G, query_end): per query head, grouped by KV head.
    """
    queries = layer.queries(query_start, query_end).float() * layer.module.scaling
    bsz, _, n_queries, head_dim = queries.shape
    n_kv, group = layer.num_kv_heads, layer.group_size
    queries = queries.reshape(bsz * n_kv, group * n_queries, head_dim)
    keys = layer.keys[:, :, :query_end].float().reshape(bsz * n_kv, query_end, head_dim)
    logits = torch.bmm(queries, keys.transpose(1, 2)).view(bsz * n_kv * group, n_queries, -1)
    future = torch.ones(n_queries, n_queries, dtype=torch.bool, device=logits.device).triu_(1)
    logits[..., query_start:query_end].masked_fill_(future, float("-inf"))
    exponentials = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    inverse_norm = exponentials.sum(dim=-1, keepdim=True).reciprocal_()
    received = torch.bmm(inverse_norm.transpose(1, 2), exponentials)
    return received.view(bsz, n_kv, group, query_end)
