"""The paper's unification claim, measured: which term of the capacity objective each method tracks.

CapKV (arXiv 2604.25975) claims that many eviction heuristics approximate one principle: keep the
set C that maximises the log-det capacity ``1/2 logdet(I + sum_{i in C} w_i v_i v_i^T)``. The
objective has two parts, the relevance ``w_i`` of a token to the query anchor and the redundancy
between value directions, and CapKV's removal cost ``-log(1 - s_i)`` (``s_i`` the ridge leverage)
scores both. This module measures, on real prefill states:

- **score agreement**: the Spearman rank correlation, per layer and KV head, between a method's
  token scores and four references: the removal cost, the relevance alone (``w_i``), the relevance
  times the value's squared norm (``w_i ||v_i||^2``, the leverage of a token whose direction is
  shared with no other) and the leverage alone (CapKV with ``tau = 0``, uniform relevance);
- **distance to the optimum**: the capacity of a method's kept set against that of a greedy
  forward selection on the objective itself, at the same size. The capacity is a monotone
  submodular function of the set (a log-det of ``I`` plus a sum of positive semi-definite
  terms), so greedy selection reaches at least ``1 - 1/e`` of the true optimum (Nemhauser, Wolsey
  and Fisher 1978); the fraction reported is against greedy, an upper bound of the fraction of
  the optimum.

Capacities use CapKV's relevance weights with its default hyperparameters and are averaged over
the query heads of each KV head, as in :mod:`capkv.analysis.diagnostics`.

Reductions (each a test in ``tests/analysis/test_unification.py``):

- orthogonal value vectors of equal norm ``c``: ``s_i = w_i c^2 / (1 + (w_i + eps) c^2)`` grows
  with ``w_i``, so CapKV ranks by relevance alone (what attention-mass heuristics aim at);
- ``tau = 0``: every ``w_i = 1`` and CapKV ranks by the leverage alone (pure redundancy);
- a relevance that grows with position (a recency prior) and orthogonal values: CapKV keeps the
  sinks and the most recent tokens, StreamingLLM's set.

H2O and SnapKV do not reduce to the relevance term as implemented: they sum softmax attention
over many queries (every prompt query, or the window's), each normalised over the keys it can
see, while ``w_i`` is the exponential of one cosine with one averaged anchor. The two rank tokens
alike only for a single query whose direction is the anchor's and keys of equal norm (softmax
is then monotone in the cosine); with many causal queries, early tokens collect attention from
more of them, a bias ``w_i`` does not have.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch

from capkv.cap import CapKV
from capkv.capacity import log_det_capacity
from capkv.engine.layer import LayerPrefill
from capkv.engine.method import EvictionMethod

REFERENCES = ("removal_cost", "relevance", "relevance_norm", "leverage")
# Multiply-adds per second of the greedy selection on this project's 2-core CPU, rounded down from
# what scripts/unification.py --calibrate measured with one thread (2.6e9); it only serves to
# refuse requests that would take hours.
GREEDY_RATE = 2.0e9


def reference_scores(layer: LayerPrefill, reference: CapKV) -> dict[str, torch.Tensor]:
    """The four reference scores of every token, (B, H_kv, T), averaged over query heads.

    Sink positions (the reference's ``n_sink`` first tokens) hold NaN in ``removal_cost`` and
    ``leverage``, which CapKV leaves out of its pool.
    """
    weights = reference.relevance_weights(layer)  # (B, H_kv, G, T)
    norms = layer.values.float().pow(2).sum(dim=-1).unsqueeze(2)  # (B, H_kv, 1, T)
    removal = -torch.log1p(-reference.ridge_leverage(layer)).mean(dim=2)
    leverage = replace(reference, tau=0.0).ridge_leverage(layer).mean(dim=2)
    pad = (reference.n_sink, 0)
    return {
        "removal_cost": torch.nn.functional.pad(removal, pad, value=math.nan),
        "relevance": weights.mean(dim=2),
        "relevance_norm": (weights * norms).mean(dim=2),
        "leverage": torch.nn.functional.pad(leverage, pad, value=math.nan),
    }


def spearman(scores: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Spearman correlation of each row of two (rows, n) tensors (average ranks for ties).

    A row whose scores are all equal has no ranking: NaN.
    """
    ranks = pd.DataFrame(scores.detach().double().cpu().numpy().T).rank().to_numpy()
    reference_ranks = pd.DataFrame(reference.detach().double().cpu().numpy().T).rank().to_numpy()
    centred = ranks - ranks.mean(axis=0)
    reference_centred = reference_ranks - reference_ranks.mean(axis=0)
    covariance = (centred * reference_centred).sum(axis=0)
    scale = np.sqrt((centred**2).sum(axis=0) * (reference_centred**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(scale > 0, covariance / scale, np.nan)


def rank_agreement(
    method: EvictionMethod, layer: LayerPrefill, references: dict[str, torch.Tensor], n_sink: int
) -> dict[str, np.ndarray]:
    """Per reference, the Spearman correlation per KV head between ``method``'s scores and the
    reference's, over the tokens the method ranks (its protected tokens and the reference's
    sinks excluded)."""
    n_first, n_last = method.protected(layer.prompt_length)
    start, end = max(n_first, n_sink), layer.prompt_length - n_last
    scores = method.score(layer)[0, :, start:end]
    return {name: spearman(scores, ref[0, :, start:end]) for name, ref in references.items()}


def greedy_capacity(values: torch.Tensor, weights: torch.Tensor, n_max: int) -> torch.Tensor:
    """Capacity of the greedy forward selection at every size 0..n_max, per KV head.

    At each step the token of largest marginal gain ``mean_g 1/2 log(1 + w_gi v_i^T A_g^-1 v_i)``
    joins the set; ``A_g^-1`` and every candidate's ``v_i^T A_g^-1 v_i`` are updated by rank-one
    (Sherman-Morrison) steps, so a step costs O(T d) per query head, never a d x d inverse.

    Parameters
    ----------
    values : torch.Tensor
        Value vectors (H_kv, T, d).
    weights : torch.Tensor
        Relevance weights per query head (H_kv, G, T).
    n_max : int
        Largest set size.

    Returns
    -------
    torch.Tensor
        (H_kv, n_max + 1) capacities in nats, averaged over query heads, float64.
    """
    values = values.double()
    weights = weights.double().clamp_min(0)
    n_heads, n_queries, n_tokens = weights.shape
    dim = values.shape[-1]
    inverse = torch.eye(dim, dtype=torch.float64).expand(n_heads, n_queries, dim, dim).clone()
    quadratic = values.pow(2).sum(dim=-1).unsqueeze(1).expand(-1, n_queries, -1).clone()
    taken = torch.zeros(n_heads, n_tokens, dtype=torch.bool)
    curve = torch.zeros(n_heads, n_max + 1, dtype=torch.float64)
    heads = torch.arange(n_heads)
    columns = values.transpose(1, 2).contiguous()  # (H_kv, d, T)
    for step in range(1, n_max + 1):
        gains = 0.5 * torch.log1p(weights * quadratic).mean(dim=1)  # (H_kv, T)
        best = gains.masked_fill(taken, -math.inf).argmax(dim=-1)
        curve[:, step] = curve[:, step - 1] + gains[heads, best]
        taken[heads, best] = True
        chosen = values[heads, best]  # (H_kv, d)
        direction = inverse @ chosen[:, None, :, None]  # A^-1 v_j, (H_kv, G, d, 1)
        weight = weights[heads, :, best]  # (H_kv, G)
        denominator = 1 + weight * quadratic[heads, :, best]
        factor = (weight / denominator)[..., None, None]
        inverse -= factor * (direction @ direction.transpose(-1, -2))
        projections = torch.bmm(direction[..., 0], columns)  # v_i . A^-1 v_j, (H_kv, G, T)
        quadratic -= factor[..., 0] * projections.pow(2)
    return curve


def greedy_seconds(layers: int, kv_heads: int, group: int, tokens: int, n_max: int, dim: int):
    """Estimated seconds of :func:`greedy_capacity` over ``layers`` layers."""
    return layers * kv_heads * group * tokens * n_max * dim * 3 / GREEDY_RATE


def check_greedy_cost(seconds: float, limit_minutes: float) -> None:
    """Refuse a greedy selection that would run longer than ``limit_minutes``."""
    if seconds > 60 * limit_minutes:
        raise ValueError(
            f"The greedy selection would take about {seconds / 3600:.1f} hours per prompt: "
            "sample fewer layers (--layers), use shorter prompts or fewer of them, or raise "
            f"--max-greedy-minutes (now {limit_minutes:g})."
        )


@dataclass
class UnificationProbe:
    """``on_layer`` callback of :func:`capkv.engine.compression.record_kept`: per layer, rank agreement of
    every method with the references, and every cell's capacity against greedy selection.

    Parameters
    ----------
    methods : dict[str, EvictionMethod]
        The methods whose scores are compared, by name (methods that never evict are skipped).
    cells : list[tuple[str, str]]
        (method name, budget label) of every selection given to ``record_kept``, in order.
    layers : sequence of int, optional
        Layers measured (all when None): the greedy selection is the expensive part.
    reference : CapKV
        Relevance weights and leverage of the objective (CapKV's defaults).
    """

    methods: dict[str, EvictionMethod]
    cells: list[tuple[str, str]]
    layers: Sequence[int] | None = None
    reference: CapKV = field(default_factory=CapKV)
    agreement: list[dict] = field(default_factory=list)
    optimum: list[dict] = field(default_factory=list)

    def on_layer(self, layer: LayerPrefill, kept: Sequence[torch.Tensor | None]) -> None:
        if self.layers is not None and layer.layer_idx not in self.layers:
            return
        references = reference_scores(layer, self.reference)
        for name, method in self.methods.items():
            if not method.evicts:
                continue
            for reference, per_head in rank_agreement(
                method, layer, references, self.reference.n_sink
            ).items():
                for head, value in enumerate(per_head):
                    self.agreement.append(
                        {
                            "method": name,
                            "reference": reference,
                            "layer": layer.layer_idx,
                            "head": head,
                            "spearman": float(value),
                        }
                    )
        self._measure_capacity(layer, kept)

    def _measure_capacity(self, layer: LayerPrefill, kept: Sequence[torch.Tensor | None]) -> None:
        weights = self.reference.relevance_weights(layer)  # (1, H_kv, G, T)
        sizes = [k.shape[-1] for k in kept if k is not None]
        if not sizes:
            return
        curve = greedy_capacity(layer.values[0], weights[0], max(sizes))
        values = layer.values.unsqueeze(2).expand(-1, -1, weights.shape[2], -1, -1)
        for (method, budget), indices in zip(self.cells, kept, strict=True):
            if indices is None:
                continue
            expanded = indices.unsqueeze(2).expand(-1, -1, weights.shape[2], -1)
            capacity = log_det_capacity(values, weights, expanded).mean(dim=2)[0]
            greedy = curve[:, indices.shape[-1]]
            for head in range(capacity.shape[0]):
                self.optimum.append(
                    {
                        "method": method,
                        "budget": budget,
                        "layer": layer.layer_idx,
                        "head": head,
                        "kept": int(indices.shape[-1]),
                        "capacity": float(capacity[head]),
                        "greedy_capacity": float(greedy[head]),
                    }
                )
