"""The interface every eviction method shares: scores per KV head and token, protected tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from capkv.budget import Budget
from capkv.layer import LayerPrefill


@dataclass
class EvictionMethod:
    """Base class of a prefill-time KV cache eviction method.

    A method turns one layer's prefill state into ``score(layer)``, shape (B, H_kv, T), higher
    meaning more worth keeping, and names the tokens it always keeps. The engine owns the rest:
    budgets, protected tokens, top-k, gather and the write-back into the cache, so a method fits
    on one screen and never asks the model for attention weights.

    Subclasses override :meth:`score`, and optionally :meth:`protected` (tokens always kept),
    :meth:`layer_budget` (a per-layer number of kept tokens, as in PyramidKV) and
    :meth:`check_budget` (budgets the method cannot honour). Every method's definition and
    hyperparameters, and the budget and protocol conventions: ``docs/methods.md``.
    """

    def score(self, layer: LayerPrefill) -> torch.Tensor:
        """Importance of every cached token, (B, H_kv, T); protected tokens may hold anything."""
        raise NotImplementedError

    def protected(self, prompt_length: int) -> tuple[int, int]:
        """Numbers of first and last prompt tokens that are always kept."""
        return 0, 0

    def layer_budget(self, layer_idx: int, num_layers: int, prompt_length: int, n_kept: int) -> int:
        """Tokens kept in layer ``layer_idx`` when the budget asks for ``n_kept`` per layer."""
        return n_kept

    def check_budget(self, budget: Budget) -> None:
        """Raise ValueError if ``budget`` cannot hold this method's protected tokens."""
        n_first, n_last = self.protected(prompt_length=10**9)
        if budget.tokens is not None and budget.tokens <= n_first + n_last:
            raise ValueError(
                f"{type(self).__name__} always keeps {n_first + n_last} tokens (sinks and window), "
                f"so budget={budget.tokens} leaves nothing to select: use a budget above "
                f"{n_first + n_last} or a smaller window."
            )

    @property
    def evicts(self) -> bool:
        """False for methods that never evict (the full-cache reference)."""
        return True

    def kept_count(self, layer: LayerPrefill, budget: Budget) -> int | None:
        """Tokens this layer keeps under ``budget``, or None when it keeps the whole prompt."""
        prompt_length = layer.prompt_length
        n_target = budget.n_kept(prompt_length)
        if not self.evicts or n_target >= prompt_length:
            return None
        n_kept = self.layer_budget(layer.layer_idx, layer.num_layers, prompt_length, n_target)
        if n_kept >= prompt_length:
            return None
        n_first, n_last = self.protected(prompt_length)
        if n_kept < n_first + n_last:
            raise ValueError(
                f"{budget.label} keeps {n_kept} of {prompt_length} tokens in layer "
                f"{layer.layer_idx}, fewer than the {n_first + n_last} tokens "
                f"{type(self).__name__} always keeps: lower the ratio or the window."
            )
        return n_kept

    def kept_indices(
        self, layer: LayerPrefill, budget: Budget, scores: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Sorted indices (B, H_kv, n) of the tokens this layer keeps, or None to keep all.

        ``scores`` may be passed when they were computed already (one score, many budgets).
        """
        n_kept = self.kept_count(layer, budget)
        if n_kept is None:
            return None
        scores = self.score(layer) if scores is None else scores
        n_first, n_last = self.protected(layer.prompt_length)
        return top_k_with_protected(scores.float(), n_kept, n_first, n_last)


def top_k_with_protected(
    scores: torch.Tensor, n_kept: int, n_first: int, n_last: int
) -> torch.Tensor:
    """Indices of the ``n_kept`` best tokens per row, the first/last protected ones included.

    Returns the indices sorted ascending, so the kept cache keeps the prompt's order.
    """
    scores = scores.clone()
    prompt_length = scores.shape[-1]
    scores[..., :n_first] = float("inf")
    scores[..., prompt_length - n_last :] = float("inf")
    return scores.topk(n_kept, dim=-1).indices.sort(dim=-1).values
