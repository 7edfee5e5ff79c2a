"""Random eviction: the control that any informed method should beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from capkv.engine.layer import LayerPrefill
from capkv.engine.method import EvictionMethod


@dataclass
class RandomEviction(EvictionMethod):
    """Keeps a uniformly random subset per KV head and layer (with optional sinks and window).

    A sanity control for the benchmark: at small budgets it should score clearly below every
    informed method. The draw depends only on ``seed``, the layer and the prompt length, so
    runs are reproducible.

    Parameters
    ----------
    seed : int
        Seed of the draws.
    n_sink, window : int
        First and last tokens always kept (0 for a pure random control).
    allocation, floor
        See :class:`~capkv.engine.method.EvictionMethod`; under ``allocation=adaptive`` the draws of
        all heads, identically distributed, are ranked together (random per-head budgets).
    """

    comparable_across_heads: ClassVar[str | None] = "independent uniform draws in every head"

    seed: int = 0
    n_sink: int = 0
    window: int = 0

    def protected(self, prompt_length: int) -> tuple[int, int]:
        return self.n_sink, self.window

    def score(self, layer: LayerPrefill) -> torch.Tensor:
        generator = torch.Generator().manual_seed(
            hash((self.seed, layer.layer_idx, layer.prompt_length)) % 2**63
        )
        shape = (layer.keys.shape[0], layer.num_kv_heads, layer.prompt_length)
        return torch.rand(shape, generator=generator).to(layer.keys.device)
