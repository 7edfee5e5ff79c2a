"""CapKV: KV cache eviction by ridge leverage against a log-det capacity objective."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from capkv.capacity import log_det_capacity
from capkv.layer import LayerPrefill, apply_rope
from capkv.method import EvictionMethod


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
    """

    tau: float = 5.0
    n_future: int = 512
    n_sink: int = 4
    eps: float = 1e-6

    def __post_init__(self) -> None:
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

    def query_anchor(self, layer: LayerPrefill) -> torch.Tensor:
        """mu_q per query head, grouped by KV head: (B, H_kv, G, d)."""
        hidden = layer.hidden_states[:, self.n_sink :]
        if getattr(layer.module, "q_norm", None) is None:
            # The projection is affine, so the mean query is the projection of the mean state.
            queries = layer.project_queries(hidden.mean(dim=1, keepdim=True))
        else:
            queries = layer.project_queries(hidden).mean(dim=2, keepdim=True)
        start = layer.prompt_length
        future = torch.arange(start, start + self.n_future, device=hidden.device).unsqueeze(0)
        cos, sin = layer.rotary_emb(queries.float(), future)
        anchor = apply_rope(queries.float(), cos.mean(1, keepdim=True), sin.mean(1, keepdim=True))
        return layer.grouped(anchor.squeeze(2))

    def relevance_weights(self, layer: LayerPrefill) -> torch.Tensor:
        """w_i per query head, (B, H_kv, G, T); the max shift runs over non-sink tokens."""
        anchor = F.normalize(self.query_anchor(layer), dim=-1)
        keys = F.normalize(layer.keys.float(), dim=-1)
        cosine = torch.einsum("bkgd,bktd->bkgt", anchor, keys).clamp(-1.0, 1.0)
        logits = self.tau * cosine
        return torch.exp(logits - logits[..., self.n_sink :].amax(dim=-1, keepdim=True))

    def ridge_leverage(self, layer: LayerPrefill) -> torch.Tensor:
        """s_i = w_i v_i^T A^-1 v_i per query head for the non-sink tokens, (B, H_kv, G, T - n_sink).

        Every s_i lies in [0, 1), since A holds ``(w_i + eps) v_i v_i^T``.
        """
        weights = self.relevance_weights(layer)[..., self.n_sink :]
        values = layer.values[:, :, self.n_sink :].float().unsqueeze(2)  # (B, H_kv, 1, T', d)
        gram = (values.transpose(-1, -2) * (weights + self.eps).unsqueeze(-2)) @ values
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

    def score(self, layer: LayerPrefill) -> torch.Tensor:
        return F.pad(self.ridge_leverage(layer).mean(dim=2), (self.n_sink, 0))

    def capacity(self, layer: LayerPrefill, kept: torch.Tensor | None = None) -> torch.Tensor:
        """Retained log-det capacity per KV head, (B, H_kv): mean over its query heads.

        ``kept`` (B, H_kv, n) selects the set C; the whole prompt when None.
        """
        weights = self.relevance_weights(layer)
        values = layer.values.unsqueeze(2).expand(-1, -1, weights.shape[2], -1, -1)
        if kept is not None:
            kept = kept.unsqueeze(2).expand(-1, -1, weights.shape[2], -1)
        return log_det_capacity(values, weights, kept).mean(dim=2)
