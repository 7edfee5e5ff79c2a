"""H2O's accumulated attention as two flash-style Triton kernels (no ``chunk x T`` tensor).

H2O scores each key by the causal softmax attention it receives from every prompt query,
summed over the queries and over the query heads of its KV head. The PyTorch path
(:func:`capkv.engine.attention.received_attention`) writes ``chunk x T`` float32 probabilities per
query head, which on a GPU costs far more memory traffic than the flash prefill itself. Here
keys and queries are streamed in tiles and nothing larger than a tile is written:

1. :func:`_row_statistics` streams the keys of each query tile with an online softmax and
   stores each query's log-sum-exp, ``(B, H, T)`` float32.
2. :func:`_column_sums` gives each program one tile of keys, streams the query tiles at or
   after it (causal) for every query head of its KV head, recomputes the logits, turns them
   into probabilities with the stored log-sum-exp and sums them over the queries.

Memory beyond the inputs is ``O(T)`` per head. The logits are accumulated in float32 from the
cache's dtype (the PyTorch path rounds them to the cache's dtype before its float32 softmax), so
bfloat16 scores agree with the PyTorch path up to that rounding; in float32 they agree to float
precision. Import this module only where Triton is installed; with ``TRITON_INTERPRET=1`` set
before the import, the kernels run on the CPU (Triton's interpreter, used by the tests).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634


@triton.jit
def _row_statistics(
    queries,
    keys,
    log_sum_exp,
    length,
    scale_log2,
    group: tl.constexpr,
    head_dim: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Log2-sum-exp of each query's causal logits; one program per (query tile, batch x head)."""
    tile = tl.program_id(0)
    head = tl.program_id(1)  # batch * num_heads + query head
    kv_head = head // group
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(
        queries + head * length * head_dim + rows[:, None] * head_dim + dims[None, :],
        mask=(rows[:, None] < length) & (dims[None, :] < head_dim),
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    key_base = keys + kv_head * length * head_dim
    end = tl.minimum((tile + 1) * BLOCK_M, length)
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = tl.load(
            key_base + cols[:, None] * head_dim + dims[None, :],
            mask=(cols[:, None] < length) & (dims[None, :] < head_dim),
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        visible = (cols[None, :] <= rows[:, None]) & (cols[None, :] < length)
        logits = tl.where(visible, logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(
            tl.exp2(logits - new_max[:, None]), axis=1
        )
        row_max = new_max
    tl.store(log_sum_exp + head * length + rows, row_max + tl.log2(row_sum), mask=rows < length)


@triton.jit
def _column_sums(
    queries,
    keys,
    log_sum_exp,
    received,
    length,
    scale_log2,
    group: tl.constexpr,
    head_dim: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Attention each key receives, summed over queries and the KV head's query heads; one
    program per (key tile, batch x KV head)."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)  # batch * num_kv_heads + KV head
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = tl.load(
        keys + kv_head * length * head_dim + cols[:, None] * head_dim + dims[None, :],
        mask=(cols[:, None] < length) & (dims[None, :] < head_dim),
        other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
    total = tl.zeros([BLOCK_N], tl.float32)
    first = (tile * BLOCK_N) // BLOCK_M * BLOCK_M  # the first query tile that sees this tile
    for member in range(group):
        head = kv_head * group + member
        for start in range(first, length, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            q = tl.load(
                queries + head * length * head_dim + rows[:, None] * head_dim + dims[None, :],
                mask=(rows[:, None] < length) & (dims[None, :] < head_dim),
                other=0.0,
            )
            if UPCAST:
                q = q.to(tl.float32)
            lse = tl.load(log_sum_exp + head * length + rows, mask=rows < length, other=0.0)
            logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            visible = (cols[None, :] <= rows[:, None]) & (rows[:, None] < length)
            probabilities = tl.where(visible, tl.exp2(logits - lse[:, None]), 0.0)
            total += tl.sum(probabilities, axis=0)
    tl.store(received + kv_head * length + cols, total, mask=cols < length)


def fused_received_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    block_m: int = 64,
    block_n: int = 64,
) -> torch.Tensor:
    """Causal attention each key receives from every query, summed over queries and groups.

    Parameters
    ----------
    queries : torch.Tensor
        Post-RoPE queries of every prompt position, (B, H, T, d), unscaled.
    keys : torch.Tensor
        Cached keys, (B, H_kv, T, d), same dtype and device; H a multiple of H_kv (query head
        ``h`` reads KV head ``h // (H / H_kv)``).
    scaling : float
        Factor of the logits (the module's ``scaling``, usually ``d ** -0.5``).
    block_m, block_n : int
        Query and key tile sizes (powers of two, at least 16).

    Returns
    -------
    torch.Tensor
        (B, H_kv, T) float32: per key, the softmax probabilities it receives, summed over the
        queries at or after it and over the query heads of its KV head.
    """
    bsz, num_heads, length, head_dim = queries.shape
    num_kv_heads = keys.shape[1]
    if keys.shape != (bsz, num_kv_heads, length, head_dim) or num_heads % num_kv_heads:
        raise ValueError(
            f"Queries {tuple(queries.shape)} and keys {tuple(keys.shape)} do not match as "
            "(B, H, T, d) and (B, H_kv, T, d) with H a multiple of H_kv."
        )
    queries, keys = queries.contiguous(), keys.to(queries.dtype).contiguous()
    group = num_heads // num_kv_heads
    log_sum_exp = torch.empty(bsz, num_heads, length, dtype=torch.float32, device=queries.device)
    received = torch.empty(bsz, num_kv_heads, length, dtype=torch.float32, device=queries.device)
    constants = {
        "group": group,
        "head_dim": head_dim,
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        # float32 inputs stay float32 (tf32 would move near-ties); bf16/fp16 accumulate in fp32.
        "PRECISION": "ieee" if queries.dtype == torch.float32 else "tf32",
        # Triton's interpreter (3.9) multiplies bfloat16 tiles wrongly: there they go in as float32.
        "UPCAST": queries.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
    }
    scale_log2 = float(scaling) * LOG2_E
    _row_statistics[(math.ceil(length / block_m), bsz * num_heads)](
        queries, keys, log_sum_exp, length, scale_log2, **constants
    )
    _column_sums[(math.ceil(length / block_n), bsz * num_kv_heads)](
        queries, keys, log_sum_exp, received, length, scale_log2, **constants
    )
    return received
