"""How every figure shows a method and a budget: colours, markers, display names and order.

One place for what all figure kinds share, so a method keeps its colour and a budget its name in
every plot and table. Values arrive as separate fields (method and variant; budget tokens and
ratio); labels are made here, for display, and never read back.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Any

from capkv.results.order import FULL
from capkv.tasks.base import task_reporting

AVERAGE = "average"

# Colour, display name and marker per method, in the tables' order (capkv.results.order).
METHODS = {
    FULL: ("#000000", "Full cache", ""),
    "capkv": ("#d62728", "CapKV", "o"),
    "snapkv": ("#1f77b4", "SnapKV", "s"),
    "pyramidkv": ("#2ca02c", "PyramidKV", "^"),
    "h2o": ("#ff7f0e", "H2O", "v"),
    "streamingllm": ("#9467bd", "StreamingLLM", "D"),
    "random": ("#7f7f7f", "Random", "x"),
    # Allocations across heads and layers (their own colours: a figure may hold all of them).
    "capkv_adaptive": ("#e377c2", "CapKV head-adaptive", "h"),
    "capkv_model": ("#8c564b", "CapKV model-wide", "P"),
    "capkv_iterative": ("#bcbd22", "CapKV iterative", "*"),
    "snapkv_adaptive": ("#17becf", "Ada-SnapKV", "s"),
    "pyramidkv_adaptive": ("#98df8a", "Ada-PyramidKV", "^"),
}
# Colour, name and marker of kvpress's scorer presses without a counterpart here
# (capkv.interop; the leaderboard). They sort after every method above, by name.
KVPRESS_PRESSES = {
    "kvpress-compactor": ("#393b79", "kvpress-compactor", "<"),
    "kvpress-cur": ("#637939", "kvpress-cur", ">"),
    "kvpress-expectedattention": ("#8c6d31", "kvpress-expectedattention", "p"),
    "kvpress-keydiff": ("#843c39", "kvpress-keydiff", "d"),
    "kvpress-knorm": ("#7b4173", "kvpress-knorm", "H"),
    "kvpress-lagkv": ("#2b8c8c", "kvpress-lagkv", "X"),
    "kvpress-leveragescore": ("#31a354", "kvpress-leveragescore", "8"),
    "kvpress-noncausalattn": ("#9c9ede", "kvpress-noncausalattn", "1"),
    "kvpress-tova": ("#756bb1", "kvpress-tova", "*"),
}
# kvpress's presses of the methods here: drawn in their counterpart's colour and marker, dashed.
KVPRESS_COUNTERPARTS = {
    "kvpress-cap": "capkv",
    "kvpress-snapkv": "snapkv",
    "kvpress-pyramidkv": "pyramidkv",
    "kvpress-observedattention": "h2o",
    "kvpress-streamingllm": "streamingllm",
    "kvpress-random": "random",
}
SPARE_COLOURS = ["#aec7e8", "#ffbb78", "#c5b0d5", "#c49c94"]  # any other method, by its name
VARIANT_LINESTYLES = [":", "-.", (0, (5, 1, 1, 1, 1, 1))]
# The subtask families of LongBench and RULER in their papers' order, as their tasks report them:
# the order of subtasks in per-task tables and of family panels.
FAMILY_OF = {
    subtask: family
    for target in ("capkv.tasks.longbench.LongBench", "capkv.tasks.ruler.RulerSuite")
    for subtask, family in task_reporting({"_target_": target}).families.items()
}
FAMILIES = list(dict.fromkeys(FAMILY_OF.values()))
SUBTASK_ORDER = list(FAMILY_OF)


def safe_name(*parts: object) -> str:
    """File name from parts joined by ``_``; anything but letters, digits, ``_.+-`` becomes ``-``."""
    return "_".join(re.sub(r"[^A-Za-z0-9_.+-]+", "-", str(part)) for part in parts)


# ----------------------------------------------------------------------------- methods


def is_full(method: str) -> bool:
    """Whether ``method`` is the full cache (no eviction)."""
    return method == FULL


def method_style(method: str, variant: str = "") -> dict[str, object]:
    """Keyword arguments of ``Axes.plot`` for ``method``: the same in every figure.

    Variants keep their method's colour and marker and get a dotted line style picked by name;
    kvpress's press of a method here (:data:`KVPRESS_COUNTERPARTS`) is its method, dashed.
    """
    spare = SPARE_COLOURS[zlib.crc32(method.encode()) % len(SPARE_COLOURS)]
    counterpart = KVPRESS_COUNTERPARTS.get(method)
    known = METHODS | KVPRESS_PRESSES
    colour, name, marker = known.get(counterpart or method, (spare, method, "P"))
    name = method if counterpart else name
    stands_out = method == "capkv"
    style: dict[str, object] = {
        "color": colour,
        "label": f"{name} ({variant})" if variant else name,
        "marker": marker or None,
        "linestyle": "--" if counterpart else "-",
        "linewidth": 2.8 if stands_out else 1.5,
        "markersize": 7 if stands_out else 5,
        "zorder": 3 if stands_out else 2,
    }
    if variant:
        style["linestyle"] = VARIANT_LINESTYLES[
            zlib.crc32(variant.encode()) % len(VARIANT_LINESTYLES)
        ]
    return style


# ----------------------------------------------------------------------------- budgets


def budget_kind(tokens: float | None, ratio: float | None) -> str:
    """``"tokens"`` (a budget in tokens per KV head), ``"ratio"`` (a fraction removed) or
    ``"full"`` (no eviction)."""
    if tokens is not None and not math.isnan(tokens):
        return "tokens"
    if ratio is not None and not math.isnan(ratio):
        return "ratio"
    return FULL


def budget_x(tokens: float | None, ratio: float | None) -> float:
    """Where a budget sits on the x axis: tokens per KV head, or the percentage removed."""
    kind = budget_kind(tokens, ratio)
    if kind == "tokens":
        return float(tokens)
    return 100 * float(ratio) if kind == "ratio" else math.nan


def budget_display(tokens: float | None, ratio: float | None) -> str:
    """``"512 tokens/head"``, ``"50% removed"`` or ``"full cache"``."""
    kind = budget_kind(tokens, ratio)
    if kind == "tokens":
        return f"{float(tokens):g} tokens/head"
    return f"{100 * float(ratio):g}% removed" if kind == "ratio" else "full cache"


def budget_sort_key(tokens: float | None, ratio: float | None) -> tuple[int, float]:
    """Full cache first, then token budgets from small to large, then ratios from the largest
    removal to the smallest (always from the tightest cache to the loosest)."""
    kind = budget_kind(tokens, ratio)
    rank = {FULL: 0, "tokens": 1, "ratio": 2}[kind]
    value = budget_x(tokens, ratio)
    return rank, 0.0 if kind == FULL else (-value if kind == "ratio" else value)


# ----------------------------------------------------------------------------- subtasks


def subtask_sort_key(subtask: str) -> tuple[int, int, str]:
    """LongBench and RULER subtasks in their papers' order, others by name, the average last."""
    if subtask == AVERAGE:
        return 2, 0, subtask
    if subtask in FAMILY_OF:
        return 0, SUBTASK_ORDER.index(subtask), subtask
    return 1, 0, subtask


def panel_sort_key(panel: str) -> tuple[int, int, str]:
    """Families in LongBench's and RULER's order, then other panels by name, the average last."""
    families = list(FAMILIES)
    if panel == AVERAGE:
        return 2, 0, panel
    return (0, families.index(panel), panel) if panel in families else (1, 0, panel)


def draw_band(ax: Any, x: Any, low: Any, high: Any, method: str, style: dict[str, object]) -> None:
    """A method's interval as a band behind its line, CapKV's darker: the same in every figure."""
    ax.fill_between(
        x,
        low,
        high,
        color=style["color"],
        alpha=0.25 if method == "capkv" else 0.12,
        linewidth=0,
        zorder=style["zorder"] - 1,
    )
