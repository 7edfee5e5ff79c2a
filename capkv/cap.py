"""CapKV: KV cache eviction by ridge leverage against a log-det capacity objective."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from capkv.capacity import log_det_capacity
from capkv.engine.allocation import head_floor, padded_indices, pooled_selection
from capkv.engine.budget import Budget
from capkv.engine.layer import LayerPrefill, StreamMemory, apply_rope
from capkv.engine.method import EvictionMethod

ANCHOR_SUM, ANCHOR_COUNT = "anchor_sum", "anchor_count"  # a streaming CapKV's query anchor


@dataclass
class CapKV(EvictionMethod):
    """CapKV (arXiv 2604.25975, ICML 2026): keep the tokens whose removal costs most capacity.

    Under a linear-Gaussian surrogate of attention, the information a kept set C carries about
    future queries is ``1/2 logdet(A_C)``, ``A_C = I + sum_{i in C} w_i v_i v_i^T``. Instead of
    a combinatorial search, every token is scored by its ridge leverage against the whole pool,
    ``s_i = w_i v_i^T A^{-1} v_i`` with ``A = I + sum_i (w_i + eps) v_i v_i^T``; by the matrix
    determinant lemma ``-log(1 - s_i)`` is the log-det lost by removing token i alone.

    The relevance weight is ``w_i = exp(tau (c_i - max_j c_j))`` with ``c_i`` the cosine between
    the cached (post-RoPE) key and a query anchor: the mean over prompt positions (sinks
    excluded) of the pre-RoPE queries, each rotated by the average RoPE rotation of the next
    ``n_future`` positions. As in kvpress's ``CapPress`` (the paper's reference code) the cosine
    normalisation, the max shift and the averaged RoPE depart from the paper's plain dot
    product; ``u_i = v_i`` (the raw value vector) is the paper's own simplification. Scores are
    computed per query head and averaged over the query heads of each KV head (GQA).

    In streaming mode (:mod:`capkv.engine.streaming`) the pool is the layer's current cache (the
    tokens kept so far and those read since), and the anchor the mean over every query read so
    far, rotated by the RoPE of the ``n_future`` positions after the last token read: the same
    objective, against what the cache can still hold.

    Parameters
    ----------
    tau : float
        Temperature of the relevance weights; larger concentrates the capacity on the tokens
        most aligned with the query anchor, 0 makes CapKV query-agnostic.
    n_future : int
        Future positions whose RoPE rotations are averaged for the query anchor.
    n_sink : int
        First tokens always kept (attention sinks); excluded from the anchor and the pool.
    eps : float
        Added to every weight in ``A`` so that it stays well conditioned.
    allocation : str
        ``uniform`` (the paper's: every KV head keeps ``n``, ranked by ``s_i``); ``adaptive``:
        the layer's ``H_kv x n`` tokens go to the highest removal costs ``-1/2 log(1 - s_i)`` of
        all its KV heads together (mean over each KV head's query heads); ``model``: one pool of
        ``L x H_kv x n`` tokens over every layer. Costs are log-det capacity in nats in every
        head and layer (the determinant lemma), so they are comparable without normalisation.
    floor : float
        Under ``adaptive`` and ``model``, every KV head keeps at least ``floor x n`` tokens (its
        sinks included), so every layer keeps at least that share of its budget.
    rounds : int
        1: one-shot leverage against the whole pool. More: a backward greedy on the log-det in
        ``rounds`` steps, each removing an equal share of the tokens to remove by removal cost
        recomputed against the tokens still kept (one-shot leverage against the whole pool
        underestimates the cost of a token once many of its neighbours are gone); each pool
        keeps the iterative set only where it retains at least the one-shot set's capacity.
    """

    tau: float = 5.0
    n_future: int = 512
    n_sink: int = 4
    eps: float = 1e-6
    rounds: int = 1

    comparable_across_heads: ClassVar[str | None] = (
        "removal cost -1/2 log(1 - s_i), in nats of log-det capacity in every head and layer"
    )
    allocations: ClassVar[tuple[str, ...]] = ("uniform", "adaptive", "model")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rounds < 1:
            raise ValueError(f"CapKV rounds must be >= 1, got {self.rounds}.")
        if self.tau < 0:
            raise ValueError(f"CapKV tau must be >= 0, got {self.tau}.")
        if self.n_future < 1:
            raise ValueError(f"CapKV n_future must be >= 1 position, got {self.n_future}.")
        if self.n_sink < 0:
            raise ValueError(f"CapKV n_sink must be >= 0, got {self.n_sink}.")
        if self.eps <= 0:
            raise ValueError(f"CapKV eps must be > 0, got {self.eps}.")

    def protected(self, prompt_length: int) -> tuple[int, int]:
        return self.n_sink, 0

    def anchor_inputs(self, layer: LayerPrefill) -> tuple[torch.Tensor, int]:
        """What the query anchor averages over the tokens new in this compression (sinks
        excluded), and the axis of those tokens: their hidden states (B, n, D), axis 1; with
        QK-norm their pre-RoPE queries (B, H, n, d), axis 2. The projection is affine, so
        without QK-norm the mean query is the projection of the mean state."""
        first_new = layer.next_position - layer.num_new
        start = layer.observed - layer.num_new + max(0, self.n_sink - first_new)
        hidden = layer.hidden_states[:, start:]
        if getattr(layer.module, "q_norm", None) is None:
            return hidden, 1
        return layer.project_queries(hidden), 2

    def query_anchor(self, layer: LayerPrefill) -> torch.Tensor:
        """mu_q per query head, grouped by KV head: (B, H_kv, G, d).

        The mean runs over every token read so far but the sinks: the prompt at the end of a
        prefill; in streaming mode the sums carried over (:meth:`remember`) plus this
        compression's new tokens. The future positions follow the last token read.
        """
        inputs, axis = self.anchor_inputs(layer)
        totals = layer.memory.totals if layer.memory is not None else {}
        if ANCHOR_SUM in totals:
            total = totals[ANCHOR_SUM] + inputs.float().sum(dim=axis, keepdim=True)
            count = totals[ANCHOR_COUNT] + inputs.shape[axis]
            mean = (total / max(count, 1)).to(inputs.dtype)
        else:
            mean = inputs.mean(dim=axis, keepdim=True)
        queries = layer.project_queries(mean) if axis == 1 else mean
        hidden = layer.hidden_states
        start = layer.next_position
        future = torch.arange(start, start + self.n_future, device=hidden.device).unsqueeze(0)
        cos, sin = layer.rotary_emb(queries.float(), future)
        anchor = apply_rope(queries.float(), cos.mean(1, keepdim=True), sin.mean(1, keepdim=True))
        return layer.grouped(anchor.squeeze(2))

    def remember(self, layer: LayerPrefill, scores: torch.Tensor) -> StreamMemory:
        """The anchor's running sum (float32) and count of the tokens read so far."""
        inputs, axis = self.anchor_inputs(layer)
        totals = layer.memory.totals if layer.memory is not None else {}
        return StreamMemory(
            totals={
                ANCHOR_SUM: totals.get(ANCHOR_SUM, 0.0) + inputs.float().sum(axis, keepdim=True),
                ANCHOR_COUNT: totals.get(ANCHOR_COUNT, 0) + inputs.shape[axis],
            }
        )

    def relevance_weights(self, layer: LayerPrefill) -> torch.Tensor:
        """w_i per query head, (B, H_kv, G, T); the max shift runs over non-sink tokens."""
        anchor = F.normalize(self.query_anchor(layer), dim=-1)
        keys = F.normalize(layer.keys.float(), dim=-1)
        cosine = torch.einsum("bkgd,bktd->bkgt", anchor, keys).clamp(-1.0, 1.0)
        logits = self.tau * cosine
        return torch.exp(logits - logits[..., self.n_sink :].amax(dim=-1, keepdim=True))

    def ridge_leverage(
        self,
        layer: LayerPrefill,
        alive: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """s_i = w_i v_i^T A^-1 v_i per query head for the non-sink tokens, (B, H_kv, G, T - n_sink).

        Every s_i lies in [0, 1), since A holds ``(w_i + eps) v_i v_i^T``. ``alive`` (B, H_kv, T)
        restricts A's pool to the tokens still kept (the whole pool when None); ``weights`` are
        :meth:`relevance_weights` when already computed.
        """
        weights = self.relevance_weights(layer) if weights is None else weights
        weights = weights[..., self.n_sink :]
        pooled = weights + self.eps
        if alive is not None:
            pooled = pooled * alive[..., self.n_sink :].unsqueeze(2)
        values = layer.values[:, :, self.n_sink :].float().unsqueeze(2)  # (B, H_kv, 1, T', d)
        gram = (values.transpose(-1, -2) * pooled.unsqueeze(-2)) @ values
        identity = torch.eye(layer.head_dim, device=values.device)
        capacity = gram + identity  # A, (B, H_kv, G, d, d)
        # A is symmetric positive definite (eigenvalues >= 1), so A = L L^T never fails and
        # v^T A^-1 v = |L^-1 v|^2. One batched call each for every KV head and query head of
        # the layer; cholesky_ex and the triangular solve never wait for the device (the
        # checked cholesky would copy its error code to the host once per layer).
        factor = torch.linalg.cholesky_ex(capacity).L
        inverse_factor = torch.linalg.solve_triangular(factor, identity, upper=False)  # L^-1
        whitened = values @ inverse_factor.transpose(-1, -2)  # rows L^-1 v_i
        return weights * whitened.square().sum(dim=-1)

    def removal_costs(
        self,
        layer: LayerPrefill,
        alive: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Log-det capacity, in nats, that removing each token alone from the kept set costs its
        KV head (mean over its query heads), (B, H_kv, T): ``-1/2 log(1 - s_i)``.

        Sinks hold ``+inf`` (always kept); tokens outside ``alive`` hold ``-inf``.
        """
        leverage = self.ridge_leverage(layer, alive, weights).clamp(max=1.0 - 1e-7)
        costs = F.pad((-0.5 * torch.log1p(-leverage)).mean(dim=2), (self.n_sink, 0))
        costs[..., : self.n_sink] = float("inf")
        return costs if alive is None else costs.masked_fill(~alive, float("-inf"))

    def score(self, layer: LayerPrefill) -> torch.Tensor:
        if layer.prompt_length <= self.n_sink:  # all sinks (a streaming cache's first chunk)
            return layer.keys.new_zeros(layer.keys.shape[:3], dtype=torch.float32)
        if self.allocation != "uniform":
            return self.removal_costs(layer)
        return F.pad(self.ridge_leverage(layer).mean(dim=2), (self.n_sink, 0))

    def kept_indices(
        self, layer: LayerPrefill, budget: Budget, scores: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        if self.rounds == 1 or self.model_wide:
            return super().kept_indices(layer, budget, scores)
        return self.select([layer], budget)[0]

    def select_model_wide(
        self, layers: list[LayerPrefill], budget: Budget
    ) -> list[torch.Tensor | None]:
        return self.select(layers, budget)

    def select(self, layers: list[LayerPrefill], budget: Budget) -> list[torch.Tensor | None]:
        """Kept indices of ``layers`` (one layer, or every layer under ``allocation=model``).

        Round k of ``rounds`` keeps ``T - ceil((T - n) k / rounds)`` tokens per head on average:
        per head (``uniform``), pooled over each layer's heads (``adaptive``) or over every
        layer's heads (``model``), each head keeping at least ``floor`` of the round's count,
        by removal cost against the tokens the previous round kept. A greedy can end below the
        one-shot choice (on the tiny test model it did, by under 0.05% of the capacity), so
        with several rounds each pool keeps whichever of the two sets retains more log-det
        capacity: the iterative choice is never worse than the one-shot one under the objective.
        """
        counts = [self.kept_count(layer, budget) for layer in layers]
        if any(count is None for count in counts):
            return [None] * len(layers)
        weights = [self.relevance_weights(layer) for layer in layers]
        pools = [list(range(len(layers)))] if self.model_wide else [[i] for i in range(len(layers))]
        kept = self.removal_rounds(layers, weights, counts, pools, self.rounds)
        if self.rounds > 1:
            one_shot = self.removal_rounds(layers, weights, counts, pools, 1)
            for pool in pools:
                if self.pool_capacity(layers, weights, one_shot, pool) > self.pool_capacity(
                    layers, weights, kept, pool
                ):
                    for i in pool:
                        kept[i] = one_shot[i]
        return kept

    def removal_rounds(
        self,
        layers: list[LayerPrefill],
        weights: list[torch.Tensor],
        counts: list[int],
        pools: list[list[int]],
        rounds: int,
    ) -> list[torch.Tensor]:
        """Padded kept indices of every layer after ``rounds`` rounds of removal (see
        :meth:`select`)."""
        prompt_length, n_kv = layers[0].prompt_length, layers[0].num_kv_heads
        alive: list[torch.Tensor | None] = [None] * len(layers)
        for step in range(1, rounds + 1):
            targets = [
                prompt_length - math.ceil((prompt_length - n) * step / rounds) for n in counts
            ]
            costs = [
                self.removal_costs(layer, kept, weight)
                for layer, kept, weight in zip(layers, alive, weights, strict=True)
            ]
            for pool in pools:
                rows = torch.tensor([targets[i] for i in pool for _ in range(n_kv)])
                if self.allocation == "uniform":
                    minimum = rows
                else:
                    floors = [head_floor(targets[i], self.floor, self.n_sink) for i in pool]
                    minimum = torch.tensor([f for f in floors for _ in range(n_kv)])
                stacked = torch.cat([costs[i] for i in pool], dim=1)
                device = stacked.device
                kept = pooled_selection(stacked, rows.to(device), minimum.to(device))
                for i, layer_kept in zip(pool, kept.split(n_kv, dim=1), strict=True):
                    alive[i] = layer_kept
        return [padded_indices(kept) for kept in alive]

    def pool_capacity(
        self,
        layers: list[LayerPrefill],
        weights: list[torch.Tensor],
        kept: list[torch.Tensor],
        pool: list[int],
    ) -> float:
        """Log-det capacity the kept sets of a pool's layers retain, summed over their heads."""
        return sum(float(self.capacity(layers[i], kept[i], weights[i]).sum()) for i in pool)

    def capacity(
        self,
        layer: LayerPrefill,
        kept: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Retained log-det capacity per KV head, (B, H_kv): mean over its query heads.

        ``kept`` (B, H_kv, n) selects the set C (padding slots, -1, hold no token); the whole
        prompt when None. ``weights``: :meth:`relevance_weights`, when already computed.
        """
        weights = self.relevance_weights(layer) if weights is None else weights
        values = layer.values.unsqueeze(2).expand(-1, -1, weights.shape[2], -1, -1)
        if kept is not None:
            kept = kept.unsqueeze(2).expand(-1, -1, weights.shape[2], -1)
        return log_det_capacity(values, weights, kept).mean(dim=2)
