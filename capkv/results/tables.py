"""Every run folder into tables: ``scores``, the main table (method x budget, with intervals),
the needle rows, the intervals, the paired comparisons, perplexity, long generation, scores
by turn and score against KV bytes, as CSV and Markdown (``python -m capkv.results [results]``).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from capkv.results import (
    comparisons,
    frontier,
    length_buckets,
    long_generation,
    perplexity,
    turns,
)
from capkv.results.format import interval_markdown, markdown, with_identity_types
from capkv.results.metrics import (
    DIAGNOSTICS,
    incomplete_cells,
    load_metrics,
    ranked_runs,
    run_reporting,
    task_reportings,
)
from capkv.results.store import IDENTITY_KEYS, RUNS, TABLES_LOCK, finished_rows, method_label
from capkv.results.uncertainty import CONFIDENCE, RESAMPLES, SEED
from capkv.storage.files import write_atomically
from capkv.storage.locking import locked
from capkv.tasks.base import Reporting

# Tables written only where their kind of run is (perplexity, LongBench-E, long generation,
# shared context, byte-measured).
OPTIONAL_TABLES = (
    "perplexity",
    length_buckets.TABLE,
    long_generation.TABLE,
    turns.TABLE,
    turns.PAIRED,
    frontier.TABLE,
    frontier.PAIRED,
)


def score_table(runs: dict[Path, dict[str, Any]]) -> pd.DataFrame:
    """One row per run and subtask (``subtask = "average"`` holds the task's headline), from
    :func:`load_metrics`."""
    records = []
    for metrics in runs.values():
        identity = {key: metrics[key] for key in IDENTITY_KEYS}
        identity["kept_fraction"] = metrics["mean_kept_tokens"] / max(
            metrics["mean_prompt_tokens"], 1
        )
        for name in DIAGNOSTICS:
            identity[name] = metrics.get("diagnostics", {}).get(name, math.nan)
        for subtask, scores in [("average", metrics["scores"]), *metrics["subtasks"].items()]:
            for metric, value in scores.items():
                records.append({**identity, "subtask": subtask, "metric": metric, "score": value})
    return with_identity_types(
        pd.DataFrame.from_records(
            records,
            columns=[
                *IDENTITY_KEYS,
                "kept_fraction",
                *DIAGNOSTICS,
                "subtask",
                "metric",
                "score",
            ],
        )
    )


def needle_order(row: dict[str, Any]) -> tuple:
    """Needle rows by context length, then depth: the same order however many shards wrote
    them and in whatever order they finished."""
    meta = row.get("metadata", {})
    return meta.get("context_length", 0), meta.get("depth", 0), row["example_id"]


def needle_table(runs: dict[Path, dict[str, Any]]) -> pd.DataFrame:
    """Per-example rows of every needle run (from :func:`load_metrics`): context length, depth
    and scores."""
    records = []
    for metrics_path, metrics in runs.items():
        reporting = run_reporting(metrics_path, metrics)
        if reporting is None or reporting.benchmark != "needle":
            continue
        identity = {key: metrics[key] for key in IDENTITY_KEYS}
        rows = sorted(finished_rows(metrics_path.parent), key=needle_order)
        for row in rows:
            meta = row.get("metadata", {})
            records.append(
                {
                    **identity,
                    "context_length": meta.get("context_length"),
                    "depth": meta.get("depth"),
                    "prompt_tokens": row["prompt_tokens"],
                    **row["scores"],
                }
            )
    return with_identity_types(pd.DataFrame.from_records(records))


def main_table(
    scores: pd.DataFrame,
    reportings: dict[str, Reporting] | None = None,
    intervals: pd.DataFrame | None = None,
    averages: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Method x budget rows (the method shown with its variant, :func:`method_label`); per task
    its headline score and, for a task whose subtasks fall into several families, one column per
    family (``<task>: <family>``, the mean of its subtasks), as each task reports them
    (``reportings``, by task name, from :func:`task_reportings`; a task without one reports its
    first metric, each subtask its own family). ``average`` is the mean of the tasks'
    headlines, left empty (NaN) where a run lacks one of the tasks, so that it never averages
    over different sets of tasks. With ``intervals`` (and ``averages``) from
    :mod:`capkv.results.comparisons`, each score column is followed by its interval and example count."""
    index = ["model", "protocol", "method", "budget"]
    if scores.empty:
        return pd.DataFrame(columns=index)
    labels = zip(scores["method"], scores["variant"], strict=True)
    scores = scores.assign(method=[method_label(method, variant) for method, variant in labels])
    runs = ["model", "task", "method", "budget", "protocol"]  # the method's label holds its variant
    reportings = reportings or {}
    first_metric = scores.groupby(runs)["metric"].transform("first")
    named = scores["task"].map({task: r.headline for task, r in reportings.items()})
    headline = scores[scores["metric"] == named.fillna(first_metric)]
    tasks = headline[headline["subtask"] == "average"]
    columns = [tasks.assign(column=tasks["task"])]
    subtasks = headline[headline["subtask"] != "average"]
    family_of = {
        (task, subtask): family
        for task, reporting in reportings.items()
        for subtask, family in reporting.families.items()
    }
    pairs = zip(subtasks["task"], subtasks["subtask"], strict=True)
    families = subtasks.assign(family=[family_of.get(pair, pair[1]) for pair in pairs])
    families = families.groupby([*runs, "family"], as_index=False)["score"].mean()
    several = families.groupby("task")["family"].nunique()
    families = families[families["task"].map(several) > 1]
    columns.append(families.assign(column=families["task"] + ": " + families["family"]))
    long = pd.concat(columns, ignore_index=True)
    table = long.pivot_table(index=index, columns="column", values="score").reset_index()
    task_names = sorted(tasks["task"].unique())
    family_order = {
        (task, family): i
        for task, reporting in reportings.items()
        for i, family in enumerate(dict.fromkeys(reporting.families.values()))
    }

    def column_key(column: str) -> tuple:
        task, _, family = column.partition(": ")
        return task_names.index(task), family_order.get((task, family), len(family_order)), family

    ordered = sorted((c for c in table.columns if c not in index), key=column_key)
    table = table[[*index, *ordered]]
    table.columns.name = None
    table["average"] = table[task_names].mean(axis=1, skipna=False)
    if intervals is None or intervals.empty:
        return table
    return with_bounds(table, headline, intervals, averages)


def with_bounds(
    table: pd.DataFrame,
    headline: pd.DataFrame,
    intervals: pd.DataFrame,
    averages: pd.DataFrame | None,
) -> pd.DataFrame:
    """The main table with ``<column> low``, ``<column> high`` and ``<column> n`` after each
    score column, from the task and family rows of ``intervals`` (its headline metric)."""
    index = ["model", "protocol", "method", "budget"]
    labels = zip(intervals["method"], intervals["variant"], strict=True)
    bounds = intervals.assign(method=[method_label(m, v) for m, v in labels])
    bounds = bounds[bounds["level"] != "subtask"]
    bounds = bounds.assign(
        column=bounds["task"].where(
            bounds["level"] == "task", bounds["task"] + ": " + bounds["group"]
        )
    )
    wanted = headline[[*index, "task", "metric"]].drop_duplicates()
    bounds = bounds.merge(wanted, on=[*index, "task", "metric"])
    if averages is not None and not averages.empty:
        bounds = pd.concat([bounds, averages.assign(column="average")], ignore_index=True)
    columns = []
    for column in [c for c in table.columns if c not in index]:
        columns.append(column)
        part = bounds[bounds["column"] == column].set_index(index)[["low", "high", "n"]]
        part.columns = [f"{column} low", f"{column} high", f"{column} n"]
        table = table.merge(part, left_on=index, right_index=True, how="left")
        columns += list(part.columns)
    return table[[*index, *columns]]


def scored_columns(table: pd.DataFrame) -> list[str]:
    """The score columns of a table with intervals: those beside a ``<column> low``."""
    return [c for c in table.columns if f"{c} low" in table.columns]


def main_table_markdown(table: pd.DataFrame) -> str:
    """The main table in Markdown: each score as ``mean [low, high]``, examples in the header."""
    scored = scored_columns(table)
    if not scored:
        return markdown(table)
    caption = (
        f"Scores 0-100: mean [{100 * CONFIDENCE:g}% interval], a percentile bootstrap over the "
        f"examples ({RESAMPLES} resamples, seed {SEED}) within each subtask, averaged as the "
        "headline is (over subtasks, then over tasks); n: examples behind the score.\n\n"
    )
    return caption + interval_markdown(table, scored)


def aggregate(results_dir: str | Path) -> dict[str, pd.DataFrame]:
    """Write ``scores.csv/.md`` (every run), ``main_table.csv/.md`` (method x budget, headline
    score per task and task family), ``needle.csv`` and, where perplexity runs are,
    ``perplexity.csv/.md``, where LongBench-E runs are, ``longbench_e.csv/.md`` (scores per
    length bucket), where long-generation runs are, ``long_generation.csv/.md`` (each
    continuation against the full cache's), where shared-context runs are, ``turns.csv/.md``
    and ``turns_paired.csv/.md`` (scores by question index, :mod:`capkv.results.turns`), where
    byte-measured runs are (quantized or byte-budgeted), ``frontier.csv/.md`` and
    ``frontier_paired.csv/.md`` (score against KV bytes, :mod:`capkv.results.frontier`) under
    ``results_dir``; return the frames.

    The tables are a function of the run folders alone. One process rebuilds them at a time (a
    lock in the results folder), so concurrent runs never drop each other's cells; a cell
    holding fewer examples than it runs is named in a warning and under the Markdown tables.
    """

    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    with locked(results_dir / TABLES_LOCK):
        runs = load_metrics(results_dir)
        ranked = ranked_runs(runs)
        scores = score_table(runs)
        intervals = comparisons.interval_table(ranked)
        table = main_table(
            score_table(ranked),
            task_reportings(ranked),
            intervals,
            comparisons.average_table(ranked),
        )
        frames = {
            "scores": scores,
            "main_table": table,
            "needle": needle_table(runs),
            "intervals": intervals,
            "paired": comparisons.paired_table(ranked),
            "perplexity": perplexity.perplexity_table(runs),
            length_buckets.TABLE: length_buckets.length_bucket_table(runs),
            long_generation.TABLE: long_generation.comparison_table(runs),
        }
        frames[turns.TABLE], frames[turns.PAIRED] = turns.turn_tables(ranked)
        frames[frontier.TABLE], frames[frontier.PAIRED] = frontier.frontier_tables(ranked)
        incomplete = incomplete_cells(runs)
        note = "".join(f"\nIncomplete: {line}.\n" for line in incomplete)
        texts = {
            "scores": markdown(scores),
            "main_table": main_table_markdown(table),
            "paired": comparisons.paired_markdown(frames["paired"]),
            "perplexity": perplexity.perplexity_markdown(frames["perplexity"]),
            length_buckets.TABLE: length_buckets.length_bucket_markdown(
                frames[length_buckets.TABLE]
            ),
            turns.TABLE: turns.turn_markdown(frames[turns.TABLE]),
            turns.PAIRED: turns.paired_turn_markdown(frames[turns.PAIRED]),
            frontier.TABLE: frontier.frontier_markdown(frames[frontier.TABLE]),
            frontier.PAIRED: frontier.paired_frontier_markdown(frames[frontier.PAIRED]),
            long_generation.TABLE: long_generation.long_generation_markdown(
                frames[long_generation.TABLE]
            ),
        }
        for name, frame in frames.items():
            if name in OPTIONAL_TABLES and frame.empty:  # only where such runs are
                for suffix in (".csv", ".md"):
                    (results_dir / f"{name}{suffix}").unlink(missing_ok=True)
                continue
            write_atomically(results_dir / f"{name}.csv", frame.to_csv(index=False))
            if name in texts:
                write_atomically(results_dir / f"{name}.md", texts[name] + note)
    for line in incomplete:
        print(f"warning: {line}.", file=sys.stderr)
    return frames


def main(argv: list[str] | None = None) -> None:
    """``python -m capkv.results [results]``: rebuild the tables of a results folder."""
    parser = argparse.ArgumentParser(description="Rebuild the tables of a results folder.")
    parser.add_argument("results", nargs="?", default="results", help="default: results")
    args = parser.parse_args(argv)
    if not Path(args.results, RUNS).is_dir():
        sys.exit(f"error: {args.results} holds no runs folder; pass the results_dir of a run.")
    frames = aggregate(args.results)
    print(f"{len(frames['scores'])} score rows from the runs under {args.results}/; wrote:")
    for name, frame in frames.items():
        if name in OPTIONAL_TABLES and frame.empty:
            continue
        markdown_too = name in ("scores", "main_table", "paired", *OPTIONAL_TABLES)
        print(f"  {Path(args.results, name)}.csv" + (" and .md" if markdown_too else ""))
