"""One table and one figure ranking every method of a results folder by its mean score.

Reads the folder's ``main_table.csv`` (written by every run, or ``make tables``), averages each
method's headline score over the budgets it ran (the full cache, which has one, is the
reference line) and writes ``<plots>/leaderboard.md`` and ``leaderboard.png`` and ``.pdf``:
methods from best to worst, one column per budget and their mean; the figure also draws each
budget's 95% bootstrap interval (``main_table.csv``'s ``<column> low`` and ``high``).

    python -m capkv.figures.leaderboard results/kvpress_leaderboard plots/kvpress_leaderboard
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from capkv.figures.canvas import legend_and_title, new_figure, panel_grid, render
from capkv.figures.style import budget_display, budget_sort_key
from capkv.results.format import markdown
from capkv.results.tables import scored_columns
from capkv.storage.files import write_atomically

FULL = "full"
MEAN = "mean"
INTERVAL = "95% bootstrap interval over the examples"


def ranking(main_table: pd.DataFrame, column: str = "average") -> pd.DataFrame:
    """Methods (rows, best first) x budgets and their mean, of ``column`` (scores 0-100)."""
    rows = main_table[main_table["method"] != FULL]
    table = rows.pivot_table(index="method", columns="budget", values=column, aggfunc="mean")
    table[MEAN] = table.mean(axis=1)
    return table.sort_values(MEAN, ascending=False).round(1)


def interval_bounds(main_table: pd.DataFrame, column: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The low and high bounds of ``column``'s interval per method (rows) and budget (columns),
    from ``main_table.csv``'s ``<column> low`` and ``<column> high`` (empty frames where the
    table has none; with several models or protocols in one folder, the mean of their bounds)."""
    rows = main_table[main_table["method"] != FULL]
    if f"{column} low" not in rows:
        return pd.DataFrame(), pd.DataFrame()
    low = rows.pivot_table(index="method", columns="budget", values=f"{column} low")
    high = rows.pivot_table(index="method", columns="budget", values=f"{column} high")
    return low, high


def budget_names(scores: pd.DataFrame | None, budgets: list[str]) -> dict[str, str]:
    """Each budget label's display name and order (``512 tokens/head``, ``50% removed``) from
    ``scores.csv``'s budget fields; the label itself where the folder has no scores table."""
    if scores is None:
        return {budget: budget for budget in budgets}
    fields = scores.drop_duplicates("budget").set_index("budget")[["budget_tokens", "ratio"]]
    known = [budget for budget in budgets if budget in fields.index]
    known.sort(key=lambda budget: budget_sort_key(*fields.loc[budget]))
    names = {budget: budget_display(*fields.loc[budget]) for budget in known}
    return names | {budget: budget for budget in budgets if budget not in names}


def leaderboard_figure(
    table: pd.DataFrame,
    bounds: tuple[pd.DataFrame, pd.DataFrame],
    names: dict[str, str],
    full_score: float | None,
    title: str,
) -> Figure:
    """Horizontal bars of each method's mean over budgets, best on top; a marker per budget
    with its interval as a whisker; the full cache dashed."""
    longest = max(len(str(method)) for method in table.index)
    margins = (0.3 + 0.085 * longest, 2.0, 0.7, 0.9)  # left: the method names
    figure = new_figure(margins[0] + 5.5 + margins[1], 0.32 * len(table) + 1.6)
    (ax,) = panel_grid(figure, (1, 1), margins, (0.0, 0.0)).ravel()
    positions = list(range(len(table)))[::-1]
    ax.barh(positions, table[MEAN], color="#9ecae1", label="mean over budgets")
    low, high = bounds
    markers = "osD^v<>"
    for index, (budget, name) in enumerate(names.items()):
        offset = 0.22 * (index - (len(names) - 1) / 2)  # each budget on its own line in the bar
        heights = [position + offset for position in positions]
        scores = table[budget]
        if budget in low and budget in high:
            below = scores - low[budget].reindex(table.index)
            above = high[budget].reindex(table.index) - scores
            whiskers = [below.clip(lower=0), above.clip(lower=0)]
            style = {"ecolor": f"C{index}", "elinewidth": 0.8, "capsize": 1.5}
            ax.errorbar(scores, heights, xerr=whiskers, fmt="none", zorder=3, **style)
        marker = markers[index % len(markers)]
        ax.scatter(scores, heights, s=16, color=f"C{index}", marker=marker, label=name, zorder=4)
    if full_score is not None:
        ax.axvline(full_score, color="black", linestyle="--", linewidth=1, label="full cache")
    ax.set_yticks(positions, table.index)
    ax.set_ylim(-0.7, len(table) - 0.3)
    ax.set_xlim(0, 100)
    ax.set_xlabel("score (0-100)")
    ax.grid(axis="x", alpha=0.3)
    legend_and_title(figure, [ax], title, margins[3], legend_title="budget")
    return figure


def leaderboard_title(main_table: pd.DataFrame, column: str) -> str:
    """What is ranked (``average``: the task's headline score, or the average over the tasks),
    over which runs, and what the marks show."""
    tasks = [name for name in scored_columns(main_table) if name != "average"]
    score = column
    if column == "average" and tasks:
        score = tasks[0] if len(tasks) == 1 else f"average ({', '.join(tasks)})"
    models = " · ".join(sorted(main_table["model"].astype(str).unique()))
    protocols = " · ".join(sorted(main_table["protocol"].astype(str).unique()))
    return (
        f"Methods ranked by their mean {score} score over budgets: {models} · {protocols}\n"
        f"(markers: each budget, whiskers: its {INTERVAL})"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("plots", type=Path)
    parser.add_argument("--column", default="average", help="main_table.csv column to rank by")
    args = parser.parse_args(argv)
    source = args.results / "main_table.csv"
    if not source.exists():
        sys.exit(f"error: {source} does not exist; run the experiment (or make tables) first.")
    main_table = pd.read_csv(source)
    if args.column not in main_table.columns:
        sys.exit(
            f"error: {source} has no column {args.column!r}; pass --column with one of: "
            f"{', '.join(main_table.columns[4:])}."
        )
    table = ranking(main_table, args.column)
    if table.empty:
        sys.exit(
            f"error: {source} holds no run of an evicting method, so there is nothing to rank; "
            "run some methods (e.g. python run.py -m method=capkv,snapkv budget=512) first."
        )
    full = main_table.loc[main_table["method"] == FULL, args.column]
    scores_path = args.results / "scores.csv"
    scores = pd.read_csv(scores_path) if scores_path.exists() else None
    names = budget_names(scores, [budget for budget in table.columns if budget != MEAN])
    arguments = (
        table,
        interval_bounds(main_table, args.column),
        names,
        float(full.mean()) if len(full) else None,
        leaderboard_title(main_table, args.column),
    )
    render((args.plots / "leaderboard", leaderboard_figure, arguments))
    write_atomically(args.plots / "leaderboard.md", markdown(table.reset_index()) + "\n")
    print(markdown(table.reset_index()))


if __name__ == "__main__":
    main()
