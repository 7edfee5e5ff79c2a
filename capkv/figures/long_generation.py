"""Long generation under a bound: how closely each method's greedy continuation follows the full
cache's, against the budget (from :func:`capkv.harness.long_generation.summary_table`)."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from capkv.figures.canvas import new_figure
from capkv.figures.style import FULL, method_style
from capkv.results.order import method_sort_key

PANELS = {
    "rouge_l": "ROUGE-L F1 to the full cache's text (on tokens)",
    "identical_tokens": "tokens identical before the first divergence (symlog)",
}


def long_generation_figure(summary: pd.DataFrame, title: str) -> Figure:
    """One panel per measure (:data:`PANELS`), the mean over prompts against the budget, one
    line per method; the full cache (its own continuation: ROUGE-L 1, every token identical)
    dashed. Identical tokens are drawn on a symmetric log scale (linear below 1), since they
    range from none to every generated token."""
    figure = new_figure(5.2 * len(PANELS) + 1.4, 4.2)
    axes = figure.subplots(1, len(PANELS))
    full = summary[summary["method"] == FULL]
    methods = sorted(set(summary["method"]) - {FULL}, key=method_sort_key)
    budgets = sorted({int(b) for b in summary["budget"].dropna()})
    for ax, (column, label) in zip(axes, PANELS.items(), strict=True):
        for method in methods:
            rows = summary[summary["method"] == method].sort_values("budget")
            ax.plot(rows["budget"].astype(float), rows[column], **method_style(method))
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
