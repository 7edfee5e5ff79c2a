"""PyramidKV: SnapKV scoring with a budget that shrinks with depth."""

from __future__ import annotations

from dataclasses import dataclass

from baselines.snapkv import SnapKV


def pyramid_schedule(
    budget: int, window: int, beta: int, num_layers: int, prompt_length: int
) -> list[int]:
    """Tokens kept per KV head in every layer, the window included (KVCache-Factory's rule).

    With ``selected = budget - window``: ``min = selected // beta``, ``max = 2 selected - min``;
    if ``max >= T - window`` then ``max = T - window`` and ``min = 2 selected - max``;
    ``steps = (max - min) // (L - 1)`` and layer l keeps ``max - l steps`` plus the window.
    A prompt shorter than ``budget`` is not compressed (every layer keeps T), and one shorter
    than ``2 selected`` gets the uniform ``budget``. The mean over layers is ``budget`` up to
    the floor in ``steps`` (it exceeds it by ``(L - 1) / 2 * ((max - min) / (L - 1) - steps)``
    tokens at most).
    """
    if prompt_length < budget:
        return [prompt_length] * num_layers
    selected = budget - window
    if prompt_length < 2 * selected:
        return [budget] * num_layers
    min_num = selected // beta
    max_num = 2 * selected - min_num
    if max_num >= prompt_length - window:
        max_num = prompt_length - window
        min_num = 2 * selected - max_num
    steps = (max_num - min_num) // (num_layers - 1) if num_layers > 1 else 0
    return [max_num - layer * steps + window for layer in range(num_layers)]


@dataclass
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al. 2024, arXiv 2406.02069).

    Lower layers attend broadly and upper layers focus on few tokens, so the budget is spread
    as a pyramid: layer l keeps ``pyramid_schedule(...)[l]`` tokens, chosen by SnapKV's scores,
    and the mean over layers is the budget. The schedule is KVCache-Factory's (see
    :func:`pyramid_schedule`); a ratio budget first becomes ``int(T * (1 - ratio))`` tokens.

    kvpress's ``PyramidKVPress`` differs: it derives the budget from the ratio as
    ``window + T (1 - ratio)`` in floating point, rounds every layer's count, and falls back
    to a uniform budget unless ``T >= max >= min >= window``. The two agree only where the
    integer and float schedules coincide (whole divisions and no fallback).

    Parameters
    ----------
    beta : int
        Pyramid steepness: the top layer keeps ``(budget - window) // beta`` selected tokens.
    window, kernel, pooling, allocation, floor
        As in SnapKV; under ``allocation=adaptive`` each layer's pyramid budget
        (``H_kv x`` its schedule) goes to the best SnapKV scores of all its KV heads together.
    """

    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1:
            raise ValueError(f"PyramidKV beta must be >= 1, got {self.beta}.")

    def layer_budget(self, layer_idx: int, num_layers: int, prompt_length: int, n_kept: int) -> int:
        schedule = pyramid_schedule(n_kept, self.window, self.beta, num_layers, prompt_length)
        return schedule[layer_idx]
