"""SnapKV: keep what the observation window attends to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from capkv.engine.attention import received_attention
from capkv.engine.layer import LayerPrefill
from capkv.engine.method import EvictionMethod


@dataclass
class SnapKV(EvictionMethod):
    """SnapKV (Li et al. 2024, arXiv 2404.14469).

    The last ``window`` prompt tokens (the observation window, which holds the question in
    query-aware runs) attend to the earlier tokens; their attention, averaged over the window
    queries and smoothed by a 1-D pooling along the keys, ranks the earlier tokens. The top
    ``budget - window`` of them are kept with the whole window. Scores are averaged over the
    query heads of each KV head.

    Parameters
    ----------
    window : int
        Observation window, always kept. SnapKV and PyramidKV use 32 in their LongBench runs,
        kvpress 64.
    kernel : int
        Pooling kernel along the keys (odd; padding kernel // 2, stride 1). Larger keeps
        neighbourhoods of attended tokens rather than single tokens.
    pooling : str
        "max" (the SnapKV and PyramidKV LongBench configs) or "avg" (kvpress; zero padding
        counted in the mean at the edges).
    allocation, floor
        See :class:`~capkv.engine.method.EvictionMethod`. Under ``allocation=adaptive`` the scores of
        all KV heads are ranked together as they are (Ada-KV's choice): each is the attention
        mass a token receives, averaged over window queries, and every head's softmax spreads
        the same mass of 1 per query, so the scores are comparable across heads.
    """

    comparable_across_heads: ClassVar[str | None] = (
        "attention mass: every head's softmax gives each query a mass of 1 to spread"
    )

    window: int = 32
    kernel: int = 7
    pooling: str = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise ValueError(f"{type(self).__name__} window must be >= 1 token, got {self.window}.")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(
                f"{type(self).__name__} kernel must be odd and >= 1, got {self.kernel}."
            )
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {self.pooling!r}.")

    def protected(self, prompt_length: int) -> tuple[int, int]:
        return 0, self.window

    def score(self, layer: LayerPrefill) -> torch.Tensor:
        prompt_length = layer.prompt_length
        if prompt_length <= self.window:  # all window (a streaming cache's first chunks)
            return layer.keys.new_zeros(layer.keys.shape[:3], dtype=torch.float32)
        window = self.window
        received = received_attention(layer, prompt_length - window, prompt_length)
        scores = received[..., : prompt_length - window] / window  # (B, H_kv, G, T - w)
        flat = scores.flatten(0, 2).unsqueeze(1)
        padding = self.kernel // 2
        if self.pooling == "max":
            pooled = F.max_pool1d(flat, self.kernel, stride=1, padding=padding)
        else:
            pooled = F.avg_pool1d(flat, self.kernel, stride=1, padding=padding)
        scores = pooled.view(scores.shape).mean(dim=2)
        return F.pad(scores, (0, window))
