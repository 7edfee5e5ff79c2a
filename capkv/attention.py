"""Attention that prompt queries give to cached keys, recomputed without a T x T matrix."""

from __future__ import annotations

import torch

from capkv.layer import LayerPrefill


def _future_mask(n_queries: int, device: torch.device) -> torch.Tensor:
    """(n, n) mask of the keys after each query within one chunk (True = masked).

    Not cached: a mask made under ``torch.inference_mode`` (a run) could not be used later in a
    computation autograd tracks (a test, a caller without ``no_grad``).
    """
    return torch.ones(n_queries, n_queries, dtype=torch.bool, device=device).triu_(1)


def received_attention(layer: LayerPrefill, query_start: int, query_end: int) -> torch.Tensor:
    """Attention each key receives from prompt queries ``query_start:query_end``, summed.

    The logits are computed in the dtype of the cache (as the model's eager attention does) and
    the causal softmax runs in float32 over the keys up to the last query, so memory is
    ``(query_end - query_start) x query_end`` per query head. The probabilities of each head are
    summed over its queries by one matrix-vector product.

    Returns
    -------
    torch.Tensor
        (B, H_kv, G, query_end): per query head, grouped by KV head.
    """
    keys = layer.keys[:, :, :query_end]
    queries = layer.queries(query_start, query_end).to(keys.dtype) * layer.module.scaling
    bsz, _, n_queries, head_dim = queries.shape
    n_kv, group = layer.num_kv_heads, layer.group_size
    queries = queries.reshape(bsz * n_kv, group * n_queries, head_dim)
    keys = keys.reshape(bsz * n_kv, query_end, head_dim)
    logits = torch.bmm(queries, keys.transpose(1, 2)).view(bsz * n_kv * group, n_queries, -1)
    logits[..., query_start:query_end].masked_fill_(
        _future_mask(n_queries, logits.device), float("-inf")
    )
    probabilities = torch.softmax(logits, dim=-1, dtype=torch.float32)
    query_weights = probabilities.new_ones(1, 1, n_queries).expand(logits.shape[0], 1, n_queries)
    received = torch.bmm(query_weights, probabilities)
    return received.view(bsz, n_kv, group, query_end)
