"""Score against budget: ``<model>_<task>_<protocol>_<metric>_vs_tokens`` and ``..._vs_ratio``.

One line per method and one panel per task family (LongBench's and RULER's groups of subtasks)
plus the average; the full cache is a dashed black line. Each line carries its 95% bootstrap
interval as a band (``intervals.csv``, :mod:`capkv.results.comparisons`).
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
    AVERAGE,
    FULL,
    budget_kind,
    budget_x,
    draw_band,
    is_full,
    method_style,
    panel_sort_key,
    safe_name,
)
from capkv.results.order import method_sort_key
from capkv.results.store import RUN_KEYS

INTERVAL = "95% bootstrap intervals"


def panel_scores(intervals: pd.DataFrame) -> pd.DataFrame:
    """Score and interval per run, metric and panel, from ``intervals.csv``: one panel per task
    family and the average over subtasks (when a task spans several families); a task without
    subtasks is its own single panel. Each row gets its budget's ``kind`` and ``x``."""
    keys = [*RUN_KEYS, "budget_tokens", "ratio", "metric"]
    families = intervals[intervals["level"] == "family"]
    tasks = intervals[intervals["level"] == "task"]
    several = families.groupby("task")["group"].nunique()
    count = tasks["task"].map(several).fillna(0)
    panels = pd.concat(
        [
            families.assign(panel=families["group"]),
            tasks[count == 0].assign(panel=tasks.loc[count == 0, "task"]),
            tasks[count > 1].assign(panel=AVERAGE),
        ],
        ignore_index=True,
    )
    panels = panels[[*keys, "panel", "mean", "low", "high"]].rename(columns={"mean": "score"})
    budgets = list(zip(panels["budget_tokens"], panels["ratio"], strict=True))
    panels["kind"] = [budget_kind(*budget) for budget in budgets]
    panels["x"] = [budget_x(*budget) for budget in budgets]
    return panels


def draw_curves(ax: Axes, rows: pd.DataFrame) -> None:
    """One line per evicting method (x = budget value) with its interval as a band (a whisker
    where it ran one budget), and the full cache as a dashed horizontal line over a grey band."""
    methods = rows[["method", "variant"]].drop_duplicates().itertuples(index=False, name=None)
    for method, variant in sorted(methods, key=lambda pair: method_sort_key(*pair)):
        method_rows = rows[(rows["method"] == method) & (rows["variant"] == variant)]
        style = method_style(method, variant)
        if is_full(method):
            ax.axhline(method_rows["score"].mean(), **{**style, "linestyle": "--", "marker": None})
            low, high = method_rows["low"].mean(), method_rows["high"].mean()
            ax.axhspan(low, high, color=style["color"], alpha=0.07, linewidth=0, zorder=0)
            continue
        points = method_rows.sort_values("x")
        ax.plot(points["x"], points["score"], **style)
        draw_band(ax, points["x"], points["low"], points["high"], method, style)
        if len(points) == 1:  # a band needs two budgets: one budget's interval as a whisker
            x, score = points["x"].to_numpy(), points["score"].to_numpy()
            whisker = [score - points["low"].to_numpy(), points["high"].to_numpy() - score]
            ax.errorbar(x, score, yerr=whisker, color=style["color"],
                        capsize=4, linewidth=1.2, zorder=style["zorder"])  # fmt: skip


def format_budget_axis(ax: Axes, xs: list[float], kind: str) -> None:
    """Ticks at the budgets that were run; a log2 axis for token budgets."""
    values = sorted(set(xs))
    if kind == "tokens":
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens kept per KV head (log2 scale)")
    else:
        ax.set_xlabel("prompt tokens removed (%)")
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.minorticks_off()


def curve_figure(rows: pd.DataFrame, kind: str, metric: str, title: str) -> Figure:
    """Score against budget, one panel per family and the average, one shared legend."""
    panels = sorted(rows["panel"].unique(), key=panel_sort_key)
    figure, axes, margins = score_panels(len(panels))
    xs = list(rows.loc[rows["kind"] == kind, "x"])
    for ax, panel in zip(axes, panels, strict=False):
        draw_curves(ax, rows[rows["panel"] == panel])
        format_budget_axis(ax, xs, kind)
        ax.set_title("Average over subtasks" if panel == AVERAGE else panel)
        ax.set_ylabel(f"{metric} (0-100)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    finish_panels(figure, axes, len(panels), title, margins[3])
    return figure


def curve_jobs(intervals: pd.DataFrame, plots_dir: Path) -> Iterator[Job]:
    """One score-against-budget figure per (model, task, protocol, budget kind, metric)."""
    families = panel_scores(intervals)
    for (model, task), task_rows in families.groupby(["model", "task"]):
        for protocol in sorted(task_rows["protocol"].unique()):
            rows = for_protocol(task_rows, protocol)
            for kind, axis in [("tokens", "token budget"), ("ratio", "compression ratio")]:
                if not (rows["kind"] == kind).any():
                    continue
                for (metric,), curves in rows[rows["kind"].isin([kind, FULL])].groupby(["metric"]):
                    title = (
                        f"{metric} against {axis} (bands, or whiskers at a lone budget: "
                        f"{INTERVAL}): {model} · {task} · {protocol}"
                    )
                    stem = plots_dir / safe_name(model, task, protocol, metric, "vs", kind)
                    yield stem, curve_figure, (curves, kind, metric, title)
