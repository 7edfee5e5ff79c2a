"""Perplexity against position (``<model>_<task>_<protocol>_perplexity_by_position``) and
against the capacity the compressions kept (``..._perplexity_vs_capacity``).

From ``perplexity.csv`` (:func:`capkv.results.perplexity.perplexity_table`): one panel per budget, one
line per method through the midpoints of the position buckets, each with its 95% bootstrap
interval over the texts as a band; the full cache is a dashed black line in every panel. The
y axis is logarithmic: eviction can multiply perplexity. The second figure puts each run's
perplexity ratio to the full cache beside CapKV's objective, the log-det capacity fraction each
compression kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from capkv.figures.canvas import Job, finish_panels, legend_and_title, new_figure, panel_grid
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
from capkv.results.perplexity import WHOLE

INTERVALS = "95% bootstrap intervals over the texts"


def draw_lines(ax: Axes, rows: pd.DataFrame) -> None:
    """One line per (method, variant) through its buckets' midpoints, with its band; the full
    cache dashed."""
    methods = rows[["method", "variant"]].drop_duplicates().itertuples(index=False, name=None)
    for method, variant in sorted(methods, key=lambda pair: method_sort_key(*pair)):
        points = rows[(rows["method"] == method) & (rows["variant"] == variant)]
        points = points.sort_values("start")
        middle = (points["start"] + points["end"]) / 2
        style = method_style(method, variant)
        if is_full(method):
            style |= {"linestyle": "--", "marker": None}
        if len(points) == 1 and not style["marker"]:  # a text of one bucket: no line to draw
            style |= {"marker": "_", "markersize": 16}
        ax.plot(middle, points["perplexity"], **style)
        draw_band(ax, middle, points["low"], points["high"], method, style)


def format_perplexity_axis(ax: Axes, rows: pd.DataFrame) -> None:
    """A log axis labelled in plain numbers; its minor ticks labelled too when the values span
    less than a decade (no power of 10 would be labelled otherwise)."""
    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    narrow = rows["high"].max() < 10 * rows["low"].min()
    ax.yaxis.set_minor_formatter(plain if narrow else NullFormatter())
    ax.set_ylabel("perplexity (log scale; lower is better)")


def variant_in_title(rows: pd.DataFrame, title: str) -> tuple[pd.DataFrame, str]:
    """A variant every line shares (the chunk, e.g. ``chunk512``) moved from the legend into
    the title."""
    variants = rows["variant"].unique()
    if len(variants) == 1 and variants[0]:
        return rows.assign(variant=""), f"{title}, {variants[0]}"
    return rows, title


def perplexity_figure(rows: pd.DataFrame, title: str) -> Figure:
    """Perplexity against position, one panel per budget (the full cache in each)."""
    rows, title = variant_in_title(rows, title)
    full = rows[rows["method"].map(is_full)]
    evicting = rows[~rows["method"].map(is_full)]
    budgets = evicting[["budget", "budget_tokens", "ratio"]].drop_duplicates()
    budgets = sorted(budgets.itertuples(index=False), key=lambda b: budget_sort_key(*b[1:]))
    panels = budgets or [None]
    columns = min(3, len(panels))
    lines = math.ceil(len(panels) / columns)
    margins, gaps = (0.8, 2.2, 0.7, 1.0), (0.8, 0.9)
    figure = new_figure(
        3.0 + 3.6 * columns + 0.8 * (columns - 1), 1.7 + 2.8 * lines + 0.9 * (lines - 1)
    )
    axes = panel_grid(figure, (lines, columns), margins, gaps)
    for ax, budget in zip(axes.ravel(), panels, strict=False):
        shown = evicting[evicting["budget"] == budget.budget] if budget is not None else evicting
        draw_lines(ax, pd.concat([full, shown]))
        ax.set_title(budget_display(*budget[1:]) if budget is not None else "full cache")
        format_perplexity_axis(ax, rows)
        ax.set_xlabel("position in the text (tokens, bucket midpoint)")
        ax.grid(alpha=0.3, which="both")
    shared = (rows["low"].min() / 1.05, rows["high"].max() * 1.05)  # one scale for every panel
    for ax in axes.ravel()[: len(panels)]:
        ax.set_ylim(*shared)
    finish_panels(figure, axes.ravel(), len(panels), f"{title}\n(bands: {INTERVALS})", margins[3])
    return figure


def capacity_figure(rows: pd.DataFrame, title: str) -> Figure:
    """The whole text's perplexity, as a ratio to the full cache's (with its paired interval),
    against the capacity fraction the compressions kept: one line per method through its
    budgets, each point labelled with its budget (tokens per KV head, or the ratio removed)."""
    rows, title = variant_in_title(rows, title)
    figure = new_figure(8.6, 4.8)
    (ax,) = panel_grid(figure, (1, 1), (0.8, 2.2, 0.7, 0.9), (0.0, 0.0)).ravel()
    methods = rows[["method", "variant"]].drop_duplicates().itertuples(index=False, name=None)
    for method, variant in sorted(methods, key=lambda pair: method_sort_key(*pair)):
        points = rows[(rows["method"] == method) & (rows["variant"] == variant)]
        points = points.sort_values("budget_tokens")
        style = method_style(method, variant)
        below = points["ratio_to_full"] - points["ratio_low"]
        above = points["ratio_high"] - points["ratio_to_full"]
        ax.errorbar(
            points["capacity_fraction"],
            points["ratio_to_full"],
            yerr=[below, above],
            color=style["color"],
            marker=style["marker"] or "o",
            linestyle=style["linestyle"],
            label=style["label"],
            zorder=style["zorder"],
            capsize=2,
        )
        for point in points.itertuples(index=False):
            ax.annotate(
                f"{point.budget_tokens:.0f}" if pd.isna(point.ratio) else f"{point.ratio:g}",
                (point.capacity_fraction, point.ratio_to_full),
                textcoords="offset points",
                xytext=(4, 3),
                fontsize=7,
                color=style["color"],
            )
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="full cache")
    ax.set_xlabel("capacity kept per compression (log-det fraction, CapKV's objective)")
    ax.set_ylabel("perplexity / full cache's (log scale; lower is better)")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.grid(alpha=0.3, which="both")
    legend_and_title(figure, [ax], f"{title}\n(error bars: paired {INTERVALS})", 0.9)
    return figure


def perplexity_jobs(table: pd.DataFrame, plots_dir: Path) -> Iterator[Job]:
    """Per (model, task, protocol) of ``perplexity.csv``: perplexity against position, and
    where the runs measured it, perplexity against the capacity kept."""
    if table.empty:
        return
    for (model, task), task_rows in table.groupby(["model", "task"]):
        for protocol in sorted(task_rows["protocol"].unique()):
            rows = for_protocol(task_rows, protocol)
            whole = rows["positions"] == WHOLE
            title = f"Perplexity against position: {model} · {task} · {protocol}"
            stem = plots_dir / safe_name(model, task, protocol, "perplexity_by_position")
            yield stem, perplexity_figure, (rows[~whole], title)
            measured = rows[whole & rows["capacity_fraction"].notna()]
            if not measured.empty:
                title = f"Perplexity against retained capacity: {model} · {task} · {protocol}"
                stem = plots_dir / safe_name(model, task, protocol, "perplexity_vs_capacity")
                yield stem, capacity_figure, (measured, title)
