"""LongBench-E's score against length (``<model>_<task>_<protocol>_score_vs_length``).

From ``longbench_e.csv`` (:func:`capkv.results.length_buckets.length_bucket_table`): one
panel per budget, one line per method through the average score of LongBench-E's datasets in
each length bucket (0-4k, 4-8k, 8k+ words, as ``eval.py --e`` reports them); the full cache is a
dashed black line in every panel.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from capkv.figures.canvas import Job, finish_panels, score_panels
from capkv.figures.data import for_protocol
from capkv.figures.style import (
    budget_display,
    budget_sort_key,
    is_full,
    method_style,
    safe_name,
)
from capkv.results.order import method_sort_key
from capkv.tasks.longbench.buckets import AVERAGE, BUCKETS


def _budget_key(rows: pd.DataFrame, budget: str) -> tuple[int, float]:
    first = rows[rows["budget"] == budget].iloc[0]
    return budget_sort_key(first["budget_tokens"], first["ratio"])


def length_figure(rows: pd.DataFrame, title: str) -> Figure:
    """Average score per length bucket, a panel per budget, a line per method.

    Parameters
    ----------
    rows : pandas.DataFrame
        The ``average`` rows of ``longbench_e.csv`` of one model, task and protocol.
    title : str
        The figure's title.

    Returns
    -------
    Figure
        The figure.
    """
    full = rows["method"].map(is_full)
    budgets = sorted(rows.loc[~full, "budget"].unique(), key=lambda b: _budget_key(rows, b))
    panels = budgets or sorted(rows["budget"].unique())
    figure, axes, margins = score_panels(len(panels))
    for ax, budget in zip(axes, panels, strict=False):
        panel = rows[(rows["budget"] == budget) | full]
        pairs = panel[["method", "variant"]].drop_duplicates().itertuples(index=False, name=None)
        for method, variant in sorted(pairs, key=lambda pair: method_sort_key(*pair)):
            points = panel[(panel["method"] == method) & (panel["variant"] == variant)]
            points = points.assign(x=points["bucket"].map(BUCKETS.index)).sort_values("x")
            style = method_style(method, variant)
            if is_full(method):
                style |= {"linestyle": "--"}
            ax.plot(points["x"], points["score"], **style)
        first = panel[panel["budget"] == budget].iloc[0]
        ax.set_title(budget_display(first["budget_tokens"], first["ratio"]))
        ax.set_xticks(range(len(BUCKETS)), list(BUCKETS))
        ax.set_xlim(-0.3, len(BUCKETS) - 0.7)
        ax.set_xlabel("context length (words)")
        ax.set_ylabel("score (0-100)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    finish_panels(figure, axes, len(panels), title, margins[3])
    return figure


def length_jobs(table: pd.DataFrame, plots_dir: Path) -> Iterator[Job]:
    """One figure per (model, task, protocol) of ``longbench_e.csv``."""
    if table.empty:
        return
    averages = table[table["subtask"] == AVERAGE]
    for (model, task), task_rows in averages.groupby(["model", "task"]):
        for protocol in sorted(task_rows["protocol"].unique()):
            rows = for_protocol(task_rows, protocol)
            title = (
                f"Score against context length (average over the datasets): "
                f"{model} · {task} · {protocol}"
            )
            stem = plots_dir / safe_name(model, task, protocol, "score_vs_length")
            yield stem, length_figure, (rows, title)
