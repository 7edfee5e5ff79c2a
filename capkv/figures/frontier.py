"""Score against KV bytes (``<model>_<task>_<protocol>_frontier``).

From ``frontier.csv`` (:mod:`capkv.results.frontier`): every byte-measured run (quantized, after
KIVI: Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv
2402.02750, or byte-budgeted) as a point at the bytes its cache held, as a share of the prompt's
full cache at 16 bits per value (log2 axis), and its headline score with its 95% bootstrap
interval as a whisker; a colour per method, a marker per bit width. The Pareto front (no run
holds as few bytes with a higher score) is a step line through its points, each ringed: the
best score each byte budget buys.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from capkv.figures.canvas import Job, legend_and_title, score_panels
from capkv.figures.style import method_style, safe_name
from capkv.results.frontier import HELD
from capkv.results.order import method_sort_key

INTERVAL = "95% bootstrap intervals over the examples"
BIT_MARKERS = {2: "v", 3: "<", 4: "s", 8: "D", 16: "o", 32: "^"}  # other widths: "X"
GREY = "0.35"  # the bit-width legend's markers


def bits_marker(bits: float) -> str:
    """The marker of a bit width (``X`` for one unknown or without its own)."""
    return "X" if pd.isna(bits) else BIT_MARKERS.get(int(bits), "X")


def bits_label(bits: float) -> str:
    """``4-bit``, or ``bits unknown``."""
    return "bits unknown" if pd.isna(bits) else f"{int(bits)}-bit"


def share_label(exponent: int) -> str:
    """``1/8``, ``1/2``, ``1``, ``2``: a power of two as a share of the 16-bit cache."""
    return f"1/{2**-exponent}" if exponent < 0 else str(2**exponent)


def draw_legend_entries(ax: Axes, rows: pd.DataFrame) -> None:
    """Legend entries without data: a line per method in its colour, then a grey marker per
    bit width."""
    methods = sorted(rows["method"].unique(), key=method_sort_key)
    for method in methods:
        style = method_style(method)
        ax.plot([], [], color=style["color"], linewidth=style["linewidth"], label=style["label"])
    widths = sorted(rows["bits"].dropna().unique())
    if rows["bits"].isna().any():
        widths.append(math.nan)
    for bits in widths:
        ax.plot([], [], linestyle="none", marker=bits_marker(bits), color=GREY,
                label=bits_label(bits))  # fmt: skip


def draw_points(ax: Axes, rows: pd.DataFrame) -> None:
    """Each run at its bytes held and score, its interval a whisker, in its method's colour and
    its bit width's marker."""
    for row in rows.itertuples(index=False):
        style = method_style(row.method)
        whisker = [[row.score - row.low], [row.high - row.score]]
        ax.errorbar(getattr(row, HELD), row.score, yerr=whisker, color=style["color"],
                    marker=bits_marker(row.bits), markersize=style["markersize"] + 1,
                    linestyle="none", capsize=3, linewidth=1.2, zorder=style["zorder"])  # fmt: skip


def draw_front(ax: Axes, rows: pd.DataFrame) -> None:
    """The Pareto front: a step line through its points (the score holds until the next point's
    bytes, the last one's up to the most bytes any run held), each point ringed."""
    front = rows[rows["pareto"]].sort_values([HELD, "score"])
    x = [*front[HELD], rows[HELD].max()]
    y = [*front["score"], front["score"].iloc[-1]]
    ax.step(x, y, where="post", color="black", linestyle="--", linewidth=1.0,
            label="Pareto front", zorder=1)  # fmt: skip
    ax.scatter(front[HELD], front["score"], s=220, facecolors="none", edgecolors="black",
               linewidths=1.2, zorder=4)  # fmt: skip


def set_share_axis(ax: Axes, held: pd.Series) -> None:
    """A log2 x axis over the shares held, ticked at every power of two between them."""
    low = math.floor(math.log2(held.min()))
    high = max(math.ceil(math.log2(held.max())), low + 1)
    ax.set_xscale("log", base=2)
    exponents = range(low, high + 1)
    ax.set_xticks([2.0**e for e in exponents], [share_label(e) for e in exponents])
    ax.minorticks_off()
    ax.set_xlim(2 ** (low - 0.25), 2 ** (high + 0.25))
    ax.set_xlabel("KV bytes held (share of the prompt's 16-bit full cache, log2)")


def frontier_figure(rows: pd.DataFrame, title: str) -> Figure:
    """Headline score against the KV bytes held, every run a point, the Pareto front marked.

    Parameters
    ----------
    rows : pandas.DataFrame
        Rows of ``frontier.csv`` of one model, task and protocol (in its order: the full
        cache, then budgets from the tightest, then methods).
    title : str
        The figure's title.

    Returns
    -------
    Figure
        The figure.
    """
    figure, axes, margins = score_panels(1)
    ax = axes[0]
    draw_legend_entries(ax, rows)
    draw_front(ax, rows)
    draw_points(ax, rows)
    set_share_axis(ax, rows[HELD])
    ax.set_ylabel(f"{rows['metric'].iloc[0]} (0-100)")
    ax.set_ylim(-4, 104)
    ax.grid(alpha=0.3)
    legend_and_title(figure, axes, f"{title}\n(whiskers: {INTERVAL})", margins[3], "method · bits")
    return figure


def frontier_jobs(table: pd.DataFrame, plots_dir: Path) -> Iterator[Job]:
    """One figure per (model, task, protocol) of ``frontier.csv``."""
    if table.empty:
        return
    for (model, task, protocol), rows in table.groupby(["model", "task", "protocol"]):
        title = f"Score against KV bytes: {model} · {task} · {protocol}"
        stem = plots_dir / safe_name(model, task, protocol, "frontier")
        yield stem, frontier_figure, (rows, title)
