"""One table and one figure ranking every method of a results folder by its mean score.

Reads the folder's ``main_table.csv`` (written by every run, or ``make tables``), averages each
method's headline score over the budgets it ran (the full cache, which has one, is the
reference line) and writes ``<plots>/leaderboard.md`` and ``leaderboard.png``: methods from
best to worst, one column per budget and their mean.

    python -m capkv.leaderboard results/kvpress_leaderboard plots/kvpress_leaderboard
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from capkv.results import markdown, write_atomically  # noqa: E402

FULL = "full"
MEAN = "mean"


def ranking(main_table: pd.DataFrame, column: str = "average") -> pd.DataFrame:
    """Methods (rows, best first) x budgets and their mean, of ``column`` (scores 0-100)."""
    rows = main_table[main_table["method"] != FULL]
    table = rows.pivot_table(index="method", columns="budget", values=column, aggfunc="mean")
    table[MEAN] = table.mean(axis=1)
    return table.sort_values(MEAN, ascending=False).round(1)


def draw(table: pd.DataFrame, full_score: float | None, path: Path) -> None:
    """Horizontal bars of the mean, best on top, a dot per budget, the full cache dashed."""
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(table) + 1.2))
    positions = range(len(table))[::-1]
    ax.barh(list(positions), table[MEAN], color="#9ecae1", label="mean over budgets")
    markers = "osD^v"
    for index, budget in enumerate(c for c in table.columns if c != MEAN):
        ax.scatter(table[budget], list(positions), s=14, zorder=3, label=budget,
                   marker=markers[index % len(markers)])  # fmt: skip
    if full_score is not None:
        ax.axvline(full_score, color="black", linestyle="--", linewidth=1, label="full cache")
    ax.set_yticks(list(positions), table.index)
    ax.set_xlabel("score (0-100)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


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
    full = main_table.loc[main_table["method"] == FULL, args.column]
    draw(table, float(full.mean()) if len(full) else None, args.plots / "leaderboard.png")
    write_atomically(args.plots / "leaderboard.md", markdown(table.reset_index()) + "\n")
    print(markdown(table.reset_index()))


if __name__ == "__main__":
    main()
