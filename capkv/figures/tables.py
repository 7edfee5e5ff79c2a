"""Per-task tables: ``<model>_<task>_<protocol>_table.md`` and ``.csv``, (method, budget,
metric) rows with the subtasks, then the average, as columns: each score with its 95% bootstrap
interval and its number of examples (``intervals.csv``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from capkv.figures.canvas import output
from capkv.figures.data import for_protocol
from capkv.figures.style import budget_sort_key, safe_name, subtask_sort_key
from capkv.results.format import interval_markdown
from capkv.results.order import method_sort_key
from capkv.results.store import method_label
from capkv.results.tables import scored_columns
from capkv.storage.files import write_atomically

INTERVAL = "95% percentile bootstrap interval over the examples, seed 0"


def task_table(rows: pd.DataFrame) -> pd.DataFrame:
    """(method, budget, metric) rows, the method shown with its variant
    (:func:`capkv.results.store.method_label`); per subtask, then the average (``group``), the mean,
    then ``<group> low``, ``<group> high`` and ``<group> n`` (``rows``: from ``intervals.csv``,
    subtask and task levels)."""
    method_key, budget_key = {}, {}
    for run in rows.drop_duplicates(["method", "variant", "budget"]).itertuples(index=False):
        method_key[method_label(run.method, run.variant)] = method_sort_key(run.method, run.variant)
        budget_key[run.budget] = budget_sort_key(run.budget_tokens, run.ratio)
    labels = [method_label(m, v) for m, v in zip(rows["method"], rows["variant"], strict=True)]
    index = ["method", "budget", "metric"]
    wide = rows.assign(method=labels).pivot_table(
        index=index, columns="group", values=["mean", "low", "high", "n"], aggfunc="first"
    )
    groups = sorted(wide["mean"].columns, key=subtask_sort_key)
    parts = {}
    for group in groups:
        parts[group] = wide["mean"][group]
        for part in ("low", "high", "n"):
            parts[f"{group} {part}"] = wide[part][group]
    table = pd.DataFrame(parts)
    order = sorted(table.index, key=lambda key: (method_key[key[0]], budget_key[key[1]], key[2]))
    table = table.loc[order].reset_index()
    table.columns.name = None
    for group in groups:
        table[f"{group} n"] = table[f"{group} n"].astype("Int64")
    return table


def task_tables(intervals: pd.DataFrame, plots_dir: Path) -> list[Path]:
    """``<model>_<task>_<protocol>_table.md`` and ``.csv`` per (model, task, protocol)."""
    written = []
    shown = intervals[intervals["level"] != "family"]
    for (model, task), task_rows in shown.groupby(["model", "task"]):
        for protocol in sorted(task_rows["protocol"].unique()):
            table = task_table(for_protocol(task_rows, protocol))
            stem = plots_dir / safe_name(model, task, protocol, "table")
            groups = scored_columns(table)
            heading = (
                f"# {model} · {task} · {protocol}\n\nScores 0-100: mean [{INTERVAL}]; n: "
                "examples behind the score.\n\n"
            )
            write_atomically(output(stem, ".md"), heading + interval_markdown(table, groups))
            write_atomically(output(stem, ".csv"), table.to_csv(index=False))
            written += [output(stem, ".md"), output(stem, ".csv")]
    return written
