"""Needle heatmaps: context length x needle depth, one panel per run, cells in [0, 1].

- ``heatmaps/<model>_<task>_<protocol>_<method>_<budget>_<score>``: one heatmap per run and score;
- ``<model>_<task>_<protocol>_<score>_heatmaps``: those heatmaps as one grid, methods as rows and
  budgets as columns, the full cache on top.

Each panel's title carries the run's mean score and its 95% bootstrap interval
(``intervals.csv``).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterator
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from capkv.figures.canvas import Job, fitted_title, new_figure, panel_grid
from capkv.figures.data import for_protocol, needle_scores
from capkv.figures.style import (
    FULL,
    budget_display,
    budget_sort_key,
    is_full,
    method_style,
    safe_name,
)
from capkv.results.order import method_sort_key
from capkv.results.store import RUN_KEYS, method_label

HEATMAP_NORM = Normalize(vmin=0.0, vmax=1.0)
HEATMAP_CMAP = "RdYlGn"


def heatmap_grid(rows: pd.DataFrame, score: str) -> pd.DataFrame:
    """Mean ``score`` per cell: depths (%) as the index, context lengths (tokens) as columns."""
    return rows.pivot_table(index="depth", columns="context_length", values=score, aggfunc="mean")


def draw_heatmap(ax: Axes, grid: pd.DataFrame, fontsize: float) -> AxesImage:
    """``grid`` on ``ax`` with the shared 0-1 red-to-green scale, each cell's value written in."""
    values = grid.to_numpy(dtype=float)
    image = ax.imshow(values, cmap=HEATMAP_CMAP, norm=HEATMAP_NORM, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [f"{length:g}" for length in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [f"{depth:g}" for depth in grid.index])
    ax.tick_params(labelsize=fontsize)
    for (row, column), value in np.ndenumerate(values):
        if not math.isnan(value):
            colour = "white" if value < 0.2 or value > 0.85 else "black"
            ax.text(
                column,
                row,
                f"{value:.2g}",
                ha="center",
                va="center",
                color=colour,
                fontsize=fontsize,
            )
    return image


def score_label(score: str) -> str:
    """Colour bar label of a needle score."""
    return {"exact": "exact match (0-1)", "graded": "graded score (0-1)"}.get(score, score)


def heatmap_layout(runs: pd.DataFrame) -> tuple[list[tuple[str, str]], list[str]]:
    """Rows ((method, variant), the full cache first) and columns (budget labels) of a grid."""
    methods = sorted(
        runs[["method", "variant"]].drop_duplicates().itertuples(index=False, name=None),
        key=lambda pair: method_sort_key(*pair),
    )
    budgets = runs[runs["budget"] != FULL].drop_duplicates("budget")
    order = sorted(
        budgets.itertuples(index=False),
        key=lambda run: budget_sort_key(run.budget_tokens, run.ratio),
    )
    return methods, [run.budget for run in order] or [FULL]


def heatmap_figure(rows: pd.DataFrame, score: str, title: str, bounds: dict) -> Figure:
    """Needle heatmaps of ``rows``, methods as rows and budgets as columns (a single run gives a
    single panel); the full cache sits in the first column of its row. One colour bar. Each
    panel's title holds the run's mean score and its 95% interval (``bounds``: (method, variant,
    budget) -> (mean, low, high, n), scores 0-100, shown 0-1 as the cells are)."""
    methods, budgets = heatmap_layout(rows)
    depths = sorted(rows["depth"].unique())
    lengths = sorted(rows["context_length"].unique())
    single = len(methods) == len(budgets) == 1
    cell = (0.75, 0.45) if single else (0.5, 0.3)
    panel = (max(2.4, cell[0] * len(lengths)), max(1.4, cell[1] * len(depths)))
    left, right, bottom, gaps = 1.2, 1.3, 0.75, (0.15, 0.35)
    width = left + right + (panel[0] + gaps[0]) * len(budgets) - gaps[0]
    title = fitted_title(title, width)
    margins = (left, right, bottom, 0.8 + 0.2 * title.count("\n"))
    height = margins[2] + margins[3] + (panel[1] + gaps[1]) * len(methods) - gaps[1]
    figure = new_figure(width, height)
    axes = panel_grid(figure, (len(methods), len(budgets)), margins, gaps)
    fontsize = 9.0 if single else max(5.5, 9.0 - 0.4 * len(lengths))
    for (i, (method, variant)), (j, budget) in product(enumerate(methods), enumerate(budgets)):
        run = rows[(rows["method"] == method) & (rows["variant"] == variant)]
        run = run if is_full(method) else run[run["budget"] == budget]
        if run.empty or (is_full(method) and j > 0):
            axes[i, j].set_axis_off()
            continue
        grid = heatmap_grid(run, score).reindex(index=depths, columns=lengths)
        image = draw_heatmap(axes[i, j], grid, fontsize)
        first = run.iloc[0]
        shown = budget_display(first["budget_tokens"], first["ratio"])
        mean, low, high, _ = bounds[method, variant, first["budget"]]
        shown += f": {mean / 100:.2f} [{low / 100:.2f}, {high / 100:.2f}]"
        axes[i, j].set_title(shown, fontsize=8)
        axes[i, j].tick_params(labelbottom=i == len(methods) - 1, labelleft=j == 0)
    label_rows(axes[:, 0], methods, panel[1])
    figure.supxlabel("context length (tokens)", y=0.2 / height, va="bottom")
    figure.suptitle(title, y=1 - 0.15 / height, va="top", fontsize=11)
    colour_bar = figure.add_axes((1 - 0.95 / width, 0.15, 0.2 / width, 0.7))
    figure.colorbar(image, cax=colour_bar, label=score_label(score))
    return figure


def label_rows(axes: np.ndarray, methods: list[tuple[str, str]], height: float) -> None:
    """The depth axis label and, left of it, the method's name in bold, on each row, broken
    (after a hyphen or space where it has one) into lines no longer than the row's ``height``
    in inches (a bold 10-point character taken as 0.09 inch)."""
    per_line = max(6, int(height / 0.09))
    for ax, (method, variant) in zip(axes, methods, strict=True):
        ax.set_ylabel("needle depth (%)", fontsize=8)
        ax.annotate(
            textwrap.fill(method_style(method, variant)["label"], per_line),
            (0, 0.5),
            xycoords="axes fraction",
            xytext=(-42, 0),
            textcoords="offset points",
            rotation=90,
            ha="right",
            va="center",
            fontsize=10,
            fontweight="bold",
        )


def run_bounds(rows: pd.DataFrame, score: str, intervals: dict) -> dict:
    """(method, variant, budget) -> (mean, low, high, n) of ``score`` for the runs in ``rows``
    (``intervals``: from :func:`capkv.figures.data.interval_of`, task level)."""
    runs = rows[RUN_KEYS].drop_duplicates().itertuples(index=False, name=None)
    return {(run[2], run[3], run[4]): intervals[(*run, score, "average")] for run in runs}


def heatmap_jobs(needle: pd.DataFrame, intervals: dict, plots_dir: Path) -> Iterator[Job]:
    """One heatmap per needle run and score, under ``heatmaps/``."""
    for (model, task, method, variant, budget, protocol), rows in needle.groupby(RUN_KEYS):
        for score in needle_scores(needle):
            title = f"Needle in a haystack, {score_label(score)}: {model} · {task} · {protocol}"
            label = method_label(method, variant)
            stem = plots_dir / "heatmaps" / safe_name(model, task, protocol, label, budget, score)
            yield stem, heatmap_figure, (rows, score, title, run_bounds(rows, score, intervals))


def heatmap_grid_jobs(needle: pd.DataFrame, intervals: dict, plots_dir: Path) -> Iterator[Job]:
    """One methods x budgets grid per (model, task, protocol) and score."""
    for (model, task), task_rows in needle.groupby(["model", "task"]):
        for protocol in sorted(task_rows["protocol"].unique()):
            rows = for_protocol(task_rows, protocol)
            for score in needle_scores(needle):
                title = f"Needle in a haystack, {score_label(score)}: {model} · {task} · {protocol}"
                stem = plots_dir / safe_name(model, task, protocol, score, "heatmaps")
                bounds = run_bounds(rows, score, intervals)
                yield stem, heatmap_figure, (rows, score, title, bounds)
