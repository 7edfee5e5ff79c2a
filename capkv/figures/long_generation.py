"""Long generation under a bound (``<model>_<task>_<protocol>_<chunk...>``): how closely each
method's greedy continuation follows the full cache's, against the budget.

From ``long_generation.csv`` (:func:`capkv.results.long_generation.comparison_table`), the mean
over prompts (:func:`capkv.results.long_generation.summary_table`): one panel per measure
(:data:`PANELS`), one line per method; the full cache (its own continuation: ROUGE-L 1, every
token identical) dashed. One figure per model, task, protocol and streaming settings.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from capkv.figures.canvas import Job, new_figure
from capkv.figures.style import FULL, method_style, safe_name
from capkv.results.long_generation import SETTINGS, settings_label, summary_table
from capkv.results.order import method_sort_key

PANELS = {
    "rouge_l": "ROUGE-L F1 to the full cache's text (on tokens)",
    "identical_tokens": "tokens identical before the first divergence (symlog)",
}


def own_variant(variant: str, stream_label: str) -> str:
    """A run's variant without the streaming suffix every run of the figure shares."""
    return variant.removesuffix(stream_label).removesuffix("-")


def long_generation_figure(summary: pd.DataFrame, title: str, stream_label: str = "") -> Figure:
    """One panel per measure (:data:`PANELS`), the mean over prompts against the budget, one
    line per method (and variant); the full cache dashed. Identical tokens are drawn on a
    symmetric log scale (linear below 1), since they range from none to every generated token.

    Parameters
    ----------
    summary : pandas.DataFrame
        :func:`capkv.results.long_generation.summary_table` of one model, task, protocol and
        streaming settings.
    title : str
        The figure's title.
    stream_label : str
        The streaming suffix of the runs' variants (``chunk512-every64``), left out of labels.

    Returns
    -------
    Figure
        The figure.
    """
    figure = new_figure(5.2 * len(PANELS) + 1.4, 4.2)
    axes = figure.subplots(1, len(PANELS))
    full = summary[summary["method"] == FULL]
    pairs = summary.loc[summary["method"] != FULL, ["method", "variant"]].drop_duplicates()
    methods = sorted(pairs.itertuples(index=False, name=None), key=lambda p: method_sort_key(*p))
    budgets = sorted({int(b) for b in summary["budget_tokens"].dropna()})
    for ax, (column, label) in zip(axes, PANELS.items(), strict=True):
        for method, variant in methods:
            rows = summary[(summary["method"] == method) & (summary["variant"] == variant)]
            rows = rows.sort_values("budget_tokens")
            style = method_style(method, own_variant(variant, stream_label))
            ax.plot(rows["budget_tokens"].astype(float), rows[column], **style)
        if not full.empty:
            style = method_style(FULL)
            ax.axhline(full[column].iloc[0], **{**style, "linestyle": "--", "marker": None})
        if budgets:
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.minorticks_off()
        ax.set_xlabel("budget (tokens per KV head)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1.05)
    axes[1].set_yscale("symlog", linthresh=1)
    axes[1].set_ylim(0, max(summary["identical_tokens"].max(), 1) * 1.6)
    axes[1].yaxis.set_major_formatter(ScalarFormatter())
    axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.suptitle(title, fontsize=10)
    figure.subplots_adjust(left=0.07, right=0.86, bottom=0.14, top=0.86, wspace=0.25)
    return figure


def long_generation_jobs(table: pd.DataFrame, plots_dir: Path) -> Iterator[Job]:
    """One figure per (model, task, protocol, streaming settings) of ``long_generation.csv``."""
    if table.empty:
        return
    summary = summary_table(table)
    keys = ["model", "task", "protocol", *SETTINGS]
    for key, rows in summary.groupby(keys, dropna=False, sort=True):
        model, task, protocol = key[:3]
        settings = dict(
            zip(SETTINGS, (None if pd.isna(v) else int(v) for v in key[3:]), strict=True)
        )
        label = settings_label(settings)
        title = (
            f"{model} · {task} · {protocol}: {settings['new_tokens']}-token greedy continuations "
            f"under a bound (chunk {settings['chunk']}, compressed every "
            f"{settings['compress_every']} tokens), mean of {int(rows['prompts'].max())} prompt(s)"
        )
        stem = plots_dir / safe_name(model, task, protocol, label or "unbounded")
        yield stem, long_generation_figure, (rows, title, label)
