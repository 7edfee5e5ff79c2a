"""Score against question index (``<model>_<task>_<protocol>_score_by_turn``).

From ``turns.csv`` (:mod:`capkv.results.turns`): the shared-context protocols compress a context
once and ask its questions one after another (SCBench's multi-request mode: Li et al. 2024,
"SCBench: A KV Cache-Centric Analysis of Long-Context Methods", arXiv 2412.10319). One panel per
budget, one line per method through its headline score at each turn, with its 95% bootstrap
interval as a band; the full cache, where it ran, is a dashed black line in every panel. A
compression that kept only what the first question needed falls after turn 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from capkv.figures.canvas import Job, finish_panels, score_panels
from capkv.figures.data import for_protocol
from capkv.figures.style import (
    budget_display,
    budget_sort_key,
    draw_band,
    is_full,
    method_style,
    safe_name,
)
from capkv.results.order import method_sort_key

INTERVAL = "95% bootstrap intervals over the questions"


def draw_turn_lines(ax: Axes, rows: pd.DataFrame) -> None:
    """One line per (method, variant) through its score at each turn, with its band; the full
    cache dashed. A run of one turn gets a whisker (a band needs two turns)."""
    methods = rows[["method", "variant"]].drop_duplicates().itertuples(index=False, name=None)
    for method, variant in sorted(methods, key=lambda pair: method_sort_key(*pair)):
        points = rows[(rows["method"] == method) & (rows["variant"] == variant)]
        points = points.sort_values("turn")
        style = method_style(method, variant)
        if is_full(method):
            style |= {"linestyle": "--"}
        ax.plot(points["turn"], points["score"], **style)
        draw_band(ax, points["turn"], points["low"], points["high"], method, style)
        if len(points) == 1:
            score = points["score"].to_numpy()
            whisker = [score - points["low"].to_numpy(), points["high"].to_numpy() - score]
            ax.errorbar(points["turn"], score, yerr=whisker, color=style["color"],
                        capsize=4, linewidth=1.2, zorder=style["zorder"])  # fmt: skip


def turn_figure(rows: pd.DataFrame, title: str) -> Figure:
    """Headline score against question index, a panel per budget (the full cache in each).

    Parameters
    ----------
    rows : pandas.DataFrame
        Rows of ``turns.csv`` of one model, task and protocol.
    title : str
        The figure's title.

    Returns
    -------
    Figure
        The figure.
    """
    full = rows["method"].map(is_full)
    budgets = rows.loc[~full, ["budget", "budget_tokens", "ratio"]].drop_duplicates()
    panels = sorted(budgets.itertuples(index=False), key=lambda b: budget_sort_key(*b[1:]))
    panels = panels or [None]
    figure, axes, margins = score_panels(len(panels))
    turns = sorted(int(turn) for turn in rows["turn"].unique())
    metric = rows["metric"].iloc[0]
    for ax, budget in zip(axes, panels, strict=False):
        shown = rows[full | (rows["budget"] == budget.budget)] if budget is not None else rows
        draw_turn_lines(ax, shown)
        ax.set_title(budget_display(*budget[1:]) if budget is not None else "full cache")
        ax.set_xticks(turns, [str(turn) for turn in turns])
        ax.set_xlim(min(turns) - 0.3, max(turns) + 0.3)
        ax.set_xlabel("question index (turn; 1 = first asked)")
        ax.set_ylabel(f"{metric} (0-100)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    finish_panels(figure, axes, len(panels), f"{title}\n(bands: {INTERVAL})", margins[3])
    return figure


def turn_jobs(table: pd.DataFrame, plots_dir: Path) -> Iterator[Job]:
    """One figure per (model, task, protocol) of ``turns.csv``."""
    if table.empty:
        return
    for (model, task), task_rows in table.groupby(["model", "task"]):
        for protocol in sorted(task_rows["protocol"].unique()):
            rows = for_protocol(task_rows, protocol)
            title = f"Score against question index: {model} · {task} · {protocol}"
            stem = plots_dir / safe_name(model, task, protocol, "score_by_turn")
            yield stem, turn_figure, (rows, title)
