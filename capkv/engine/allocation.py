"""Budgets that follow the scores: which tokens each KV head keeps when heads share one budget.

Under ``allocation=uniform`` every KV head of a layer keeps the same number ``n`` of tokens. Under
``allocation=adaptive`` (Ada-KV, Feng et al. 2024, arXiv 2407.11550) the layer's ``H_kv x n``
tokens go to the best scores of all its KV heads together, each head keeping at least
``floor x n`` tokens and its protected ones; under ``allocation=model`` (CapKV only, whose scores
are in nats in every layer) one pool holds every layer's heads. Heads then keep different numbers
of tokens: a layer's kept indices are padded to its largest head with ``-1``
(:data:`PADDING`), and decoding masks each head's padding (:mod:`capkv.engine.decoding`).
"""

from __future__ import annotations

import torch

ALLOCATIONS = ("uniform", "adaptive", "model")
PADDING = -1  # an index slot a KV head does not use (its row holds fewer tokens than the layer's)


def head_floor(n_kept: int, floor: float, n_protected: int) -> int:
    """Tokens every KV head keeps at least: ``floor`` of ``n_kept``, never fewer than its
    protected tokens, never more than ``n_kept``."""
    return min(n_kept, max(n_protected, int(n_kept * floor)))


def descending_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry in its row (0 = highest), same shape as ``scores``."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return ranks.scatter_(-1, order, positions)


def pooled_selection(
    scores: torch.Tensor, n_kept: torch.Tensor, minimum: torch.Tensor
) -> torch.Tensor:
    """Keep ``n_kept.sum()`` tokens of all rows together: each row's best ``minimum[r]``, then the
    best scores of the rest, whichever row they are in.

    Parameters
    ----------
    scores : torch.Tensor
        (B, R, T) comparable scores of R rows (KV heads, of one layer or of every layer);
        protected tokens hold ``+inf``, tokens no longer available ``-inf``.
    n_kept : torch.Tensor
        (R,) tokens per row under a uniform budget; the pool holds their sum.
    minimum : torch.Tensor
        (R,) tokens each row keeps at least (its floor, protected tokens included).

    Returns
    -------
    torch.Tensor
        (B, R, T) boolean mask of the kept tokens; ``n_kept.sum()`` per batch row.
    """
    forced = descending_ranks(scores) < minimum.view(1, -1, 1)
    flat = scores.masked_fill(forced, float("inf")).flatten(1)
    chosen = flat.topk(int(n_kept.sum()), dim=-1).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, chosen, True)
    return mask.view(scores.shape)


def padded_indices(mask: torch.Tensor) -> torch.Tensor:
    """Sorted indices (B, R, n_max) of the kept tokens of every row, padded with :data:`PADDING`.

    ``n_max`` is the largest row's count; rows that keep the same number give a plain index
    tensor (no padding), identical to sorted top-k indices.
    """
    length = mask.shape[-1]
    positions = torch.arange(length, device=mask.device).expand_as(mask)
    ordered = torch.where(mask, positions, positions + length).sort(dim=-1).values
    ordered = ordered[..., : int(mask.sum(dim=-1).max())]
    return ordered.masked_fill(ordered >= length, PADDING)


def kept_mask(indices: torch.Tensor) -> torch.Tensor:
    """Which slots of padded indices hold a kept token (False for padding)."""
    return indices != PADDING


def is_ragged(indices: torch.Tensor) -> bool:
    """Whether some KV head keeps fewer tokens than the layer's largest head."""
    return bool((indices == PADDING).any())
