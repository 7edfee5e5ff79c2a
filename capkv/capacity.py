"""The paper's objective: the log-det capacity a kept set retains.

CapKV (arXiv 2604.25975, Sec. 3) scores a retained set C by
``L_C = 1/2 logdet(I + sum_{i in C} w_i v_i v_i^T)``, the information the kept value
directions carry about future queries under a linear-Gaussian surrogate of attention, with
``w_i`` the relevance of token i to the query anchor. Any method's kept set can be measured
against it.
"""

from __future__ import annotations

import torch


def log_det_capacity(
    values: torch.Tensor, weights: torch.Tensor, kept: torch.Tensor | None = None
) -> torch.Tensor:
    """1/2 logdet(I + sum_{i in C} w_i v_i v_i^T) for each batch row and head.

    Parameters
    ----------
    values : torch.Tensor
        Value vectors (..., T, d).
    weights : torch.Tensor
        Relevance weights (..., T), non-negative.
    kept : torch.Tensor, optional
        Indices (..., n) of the kept set C; all T tokens when None. Padding slots (index -1,
        :data:`capkv.engine.allocation.PADDING`) hold no token.

    Returns
    -------
    torch.Tensor
        The capacity (...), in nats, as float64.
    """
    if kept is not None:
        present = kept >= 0
        kept = kept.clamp(min=0)
        values = values.gather(-2, kept.unsqueeze(-1).expand(*kept.shape, values.shape[-1]))
        weights = weights.gather(-1, kept) * present
    scaled = values * weights.clamp_min(0).sqrt().unsqueeze(-1).to(values.dtype)
    # The d x d Gram matrix is accumulated in the input's precision (pass float64 values for
    # exact references); the log-determinant of the small matrix runs in float64.
    gram = (scaled.transpose(-1, -2) @ scaled).double()
    identity = torch.eye(values.shape[-1], dtype=torch.float64, device=values.device)
    return 0.5 * torch.linalg.slogdet(identity + gram).logabsdet
