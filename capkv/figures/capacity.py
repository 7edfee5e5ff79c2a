"""Task score against what the kept tokens retain: ``<model>_<task>_<protocol>_<metric>_capacity``.

For runs with diagnostics: one point per (method, budget), CapKV's retained log-det capacity on
the left, the relative attention-output error on the right.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from capkv.figures.canvas import Job, legend_and_title, new_figure, panel_grid
from capkv.figures.style import AVERAGE, method_style, safe_name
from capkv.results.order import method_sort_key
from capkv.results.store import RUN_KEYS


def capacity_figure(rows: pd.DataFrame, metric: str, title: str) -> Figure:
    """Task score against the retained log-det capacity and against the attention error."""
    figure = new_figure(11.5, 4.4)
    axes = panel_grid(figure, (1, 2), (0.8, 1.9, 0.7, 0.7), (0.9, 0.0)).ravel()
    panels = [
        ("capacity_fraction", "retained log-det capacity (fraction of the full cache's)"),
        ("attention_error", "relative attention-output error vs full cache"),
    ]
    methods = rows[["method", "variant"]].drop_duplicates().itertuples(index=False, name=None)
    methods = sorted(methods, key=lambda pair: method_sort_key(*pair))
    for ax, (column, label) in zip(axes, panels, strict=True):
        for method, variant in methods:
            points = rows[(rows["method"] == method) & (rows["variant"] == variant)]
            style = method_style(method, variant)
            ax.scatter(
                points[column],
                points["score"],
                color=style["color"],
                marker=style["marker"] or "o",
                label=style["label"],
                s=48 if method == "capkv" else 30,
                zorder=style["zorder"],
            )
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric} (0-100)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    legend_and_title(figure, axes, title, 0.7)
    return figure


def capacity_jobs(scores: pd.DataFrame, intervals: pd.DataFrame, plots_dir: Path) -> Iterator[Job]:
    """One capacity figure per (model, task, protocol, metric) whose runs carry diagnostics.

    Only the ranked runs (0-100, higher is better: those of ``intervals.csv``) are drawn;
    perplexity runs have their own figure (:func:`capkv.figures.perplexity.capacity_figure`).
    """
    if "capacity_fraction" not in scores or intervals.empty:
        return
    measured = scores[(scores["subtask"] == AVERAGE) & scores["capacity_fraction"].notna()]
    ranked = intervals[[*RUN_KEYS, "metric"]].drop_duplicates()
    measured = measured.merge(ranked, on=[*RUN_KEYS, "metric"])
    for (model, task, protocol, metric), rows in measured.groupby(
        ["model", "task", "protocol", "metric"]
    ):
        title = f"{metric} against what the kept tokens retain: {model} · {task} · {protocol}"
        stem = plots_dir / safe_name(model, task, protocol, metric, "capacity")
        yield stem, capacity_figure, (rows, metric, title)
