"""StreamingLLM: attention sinks plus a sliding window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from capkv.engine.layer import LayerPrefill
from capkv.engine.method import EvictionMethod


@dataclass
class StreamingLLM(EvictionMethod):
    """StreamingLLM (Xiao et al. 2023, arXiv 2309.17453).

    Keeps the first ``n_sink`` tokens, which absorb attention mass whatever their content, and
    the most recent ``budget - n_sink`` tokens; no scores are computed. Kept keys keep their
    original RoPE positions (as kvpress does; the paper re-rotates them inside the window).

    Parameters
    ----------
    n_sink : int
        Initial tokens always kept.

    It has no scores (recency only), so only ``allocation=uniform`` is possible.
    """

    n_sink: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_sink < 0:
            raise ValueError(f"StreamingLLM n_sink must be >= 0, got {self.n_sink}.")

    def protected(self, prompt_length: int) -> tuple[int, int]:
        return self.n_sink, 0

    def score(self, layer: LayerPrefill) -> torch.Tensor:
        positions = torch.arange(layer.prompt_length, device=layer.keys.device, dtype=torch.float32)
        return positions.expand(layer.keys.shape[0], layer.num_kv_heads, -1)
