"""Attention that prompt queries give to cached keys, recomputed without a T x T matrix."""

from __future__ import annotations

import functools
import logging

import torch

from capkv.engine.layer import LayerPrefill


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


@functools.cache
def _fused_kernel():
    """:func:`capkv.engine.h2o_kernel.fused_received_attention`, or None (one warning) without Triton."""
    try:
        from capkv.engine.h2o_kernel import fused_received_attention
    except ImportError as error:
        logging.getLogger(__name__).warning(
            "Triton is not importable (%s): H2O scores on CUDA fall back to the chunked PyTorch "
            "path; install the 'triton' extra for the fused kernel.",
            error,
        )
        return None
    return fused_received_attention


def accumulated_attention(
    layer: LayerPrefill, chunk: int = 128, fused: bool | None = None
) -> torch.Tensor:
    """Attention each key receives from every prompt query, averaged over its query heads.

    In streaming mode (:attr:`LayerPrefill.new_tokens`) only the queries of the tokens read
    since the layer's last compression are counted; the fused kernel needs every query, so it
    serves whole prompts only.

    Parameters
    ----------
    layer : LayerPrefill
        The layer whose prompt queries and cached keys are used.
    chunk : int
        Queries per chunk of the PyTorch path (memory ``chunk x T`` per query head).
    fused : bool, optional
        True: the Triton kernel of :mod:`capkv.engine.h2o_kernel` (memory ``O(T)`` per head); False:
        the chunked PyTorch path. None (default): the kernel on CUDA when Triton imports and
        every query is new, the chunked path otherwise.

    Returns
    -------
    torch.Tensor
        (B, H_kv, T) float32: per key, the causal softmax probabilities summed over the queries
        and averaged over the query heads of its KV head.
    """
    keys = layer.keys
    prompt_length = layer.prompt_length
    first_query = prompt_length - layer.num_new
    if fused is None:
        fused = keys.is_cuda and first_query == 0 and _fused_kernel() is not None
    if fused:
        kernel = _fused_kernel()
        if kernel is None:
            raise ImportError("The fused H2O kernel needs Triton: pip install triton.")
        queries = layer.queries(0).to(keys.dtype)
        return kernel(queries, keys, layer.module.scaling) / layer.group_size
    scores = torch.zeros(
        keys.shape[0], keys.shape[1], prompt_length, dtype=torch.float32, device=keys.device
    )
    for start in range(first_query, prompt_length, chunk):
        end = min(start + chunk, prompt_length)
        scores[..., :end] += received_attention(layer, start, end).mean(dim=2)
    return scores
