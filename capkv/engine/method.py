"""The interface every eviction method shares: scores per KV head and token, protected tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from capkv.engine.allocation import ALLOCATIONS, head_floor, padded_indices, pooled_selection
from capkv.engine.budget import Budget
from capkv.engine.layer import LayerPrefill, StreamMemory


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

    Parameters
    ----------
    allocation : str
        ``uniform``: every KV head of a layer keeps the same number ``n`` of tokens.
        ``adaptive`` (Ada-KV, arXiv 2407.11550): the layer's ``H_kv x n`` tokens go to the best
        scores of all its KV heads together (:mod:`capkv.engine.allocation`), for methods whose scores
        are comparable across heads (:attr:`comparable_across_heads` says why they are).
        ``model``: one pool over every layer's heads, for methods whose scores are comparable
        across layers too (CapKV).
    floor : float
        Under a non-uniform allocation, every KV head keeps at least ``floor x n`` tokens (and
        its protected ones), so every layer keeps at least that share of its budget. In [0, 1].
    """

    allocation: str = "uniform"
    floor: float = 0.2

    #: Why scores of different KV heads can be ranked together (None: the method has no scores,
    #: only ``allocation=uniform``).
    comparable_across_heads: ClassVar[str | None] = None
    #: Allocations the method supports.
    allocations: ClassVar[tuple[str, ...]] = ("uniform", "adaptive")

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.allocation not in ALLOCATIONS:
            raise ValueError(
                f"allocation={self.allocation!r} is not an allocation; choose one of: "
                f"{', '.join(ALLOCATIONS)}."
            )
        if self.allocation != "uniform" and self.comparable_across_heads is None:
            raise ValueError(
                f"{name} has no scores to rank across heads, so it only supports "
                "allocation=uniform; drop method.allocation or choose a scoring method."
            )
        if self.allocation not in self.allocations:
            raise ValueError(
                f"{name} scores are not comparable across layers, so allocation="
                f"{self.allocation} is refused; use one of: {', '.join(self.allocations)}."
            )
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(
                f"floor={self.floor} is outside [0, 1]; pass the share of a head's uniform "
                "budget it keeps at least, e.g. method.floor=0.2."
            )

    @property
    def model_wide(self) -> bool:
        """Whether the kept tokens of a layer depend on every layer's scores (``model``)."""
        return self.allocation == "model"

    def score(self, layer: LayerPrefill) -> torch.Tensor:
        """Importance of every cached token, (B, H_kv, T); protected tokens may hold anything."""
        raise NotImplementedError

    def protected(self, prompt_length: int) -> tuple[int, int]:
        """Numbers of first and last prompt tokens that are always kept."""
        return 0, 0

    def remember(self, layer: LayerPrefill, scores: torch.Tensor) -> StreamMemory:
        """What the layer's next compression in streaming mode reads of this one
        (:attr:`LayerPrefill.memory`; :mod:`capkv.engine.streaming`): nothing by default. ``scores``
        are this compression's :meth:`score`."""
        return StreamMemory()

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
        if not self.evicts:
            return None
        # The budget and a per-layer schedule (PyramidKV) follow the tokens read so far, the
        # same in every layer: the prompt at the end of a prefill. In streaming mode a layer's
        # cache is shorter than that (and differs from the other layers').
        prompt_length, read = layer.prompt_length, layer.next_position
        n_target = budget.n_kept(read)
        if n_target >= read:  # everything read fits
            return None
        n_kept = self.layer_budget(layer.layer_idx, layer.num_layers, read, n_target)
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
        Under ``allocation=adaptive`` the KV heads keep different numbers of tokens: the rows
        are padded with ``-1`` to the largest head (:func:`capkv.engine.allocation.padded_indices`).
        """
        n_kept = self.kept_count(layer, budget)
        if n_kept is None:
            return None
        scores = self.score(layer) if scores is None else scores
        n_first, n_last = self.protected(layer.prompt_length)
        if self.allocation == "uniform":
            return top_k_with_protected(scores.float(), n_kept, n_first, n_last)
        if self.model_wide:
            raise ValueError(
                f"{type(self).__name__} with allocation=model chooses every layer together: "
                "use select_model_wide after the whole prefill."
            )
        scores = with_protected(scores.float(), n_first, n_last)
        rows = torch.full((scores.shape[1],), n_kept, device=scores.device)
        minimum = torch.full_like(rows, head_floor(n_kept, self.floor, n_first + n_last))
        return padded_indices(pooled_selection(scores, rows, minimum))

    def select_model_wide(
        self, layers: list[LayerPrefill], budget: Budget
    ) -> list[torch.Tensor | None]:
        """Kept indices of every layer under ``allocation=model`` (methods that support it)."""
        raise NotImplementedError(f"{type(self).__name__} has no model-wide allocation.")


def top_k_with_protected(
    scores: torch.Tensor, n_kept: int, n_first: int, n_last: int
) -> torch.Tensor:
    """Indices of the ``n_kept`` best tokens per row, the first/last protected ones included.

    Returns the indices sorted ascending, so the kept cache keeps the prompt's order.
    """
    scores = with_protected(scores, n_first, n_last)
    return scores.topk(n_kept, dim=-1).indices.sort(dim=-1).values


def with_protected(scores: torch.Tensor, n_first: int, n_last: int) -> torch.Tensor:
    """A copy of ``scores`` with the first ``n_first`` and last ``n_last`` tokens at ``+inf``."""
    scores = scores.clone()
    prompt_length = scores.shape[-1]
    scores[..., :n_first] = float("inf")
    scores[..., prompt_length - n_last :] = float("inf")
    return scores
