"""Per-task tables: ``<model>_<task>_<protocol>_table.md`` and ``.csv``, (method, budget,
metric) rows with the subtasks, then the average, as columns."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from capkv.figures.canvas import output
from capkv.figures.data import for_protocol
from capkv.figures.style import budget_sort_key, method_sort_key, safe_name, subtask_sort_key
from capkv.results import markdown, method_label, write_atomically


def task_table(rows: pd.DataFrame) -> pd.DataFrame:
    """(method, budget, metric) rows, the method shown with its variant
    (:func:`capkv.results.method_label`); subtasks, then the average, as columns."""
    method_key, budget_key = {}, {}
    for run in rows.drop_duplicates(["method", "variant", "budget"]).itertuples(index=False):
        method_key[method_label(run.method, run.variant)] = method_sort_key(run.method, run.variant)
        budget_key[run.budget] = budget_sort_key(run.budget_tokens, run.ratio)
    labels = [method_label(m, v) for m, v in zip(rows["method"], rows["variant"], strict=True)]
    table = rows.assign(method=labels).pivot_table(
        index=["method", "budget", "metric"], columns="subtask", values="score", aggfunc="mean"
    )
    table = table[sorted(table.columns, key=subtask_sort_key)]
    order = sorted(table.index, key=lambda key: (method_key[key[0]], budget_key[key[1]], key[2]))
    table = table.loc[order].reset_index()
    table.columns.name = None
    return table


def task_tables(scores: pd.DataFrame, plots_dir: Path) -> list[Path]:
    """``<model>_<task>_<protocol>_table.md`` and ``.csv`` per (model, task, protocol)."""
    written = []
    for (model, task), task_rows in scores.groupby(["model", "task"]):
        for protocol in sorted(task_rows["protocol"].unique()):
            table = task_table(for_protocol(task_rows, protocol))
            stem = plots_dir / safe_name(model, task, protocol, "table")
            heading = f"# {model} · {task} · {protocol} (scores 0-100)\n\n"
            write_atomically(output(stem, ".md"), heading + markdown(table))
            write_atomically(output(stem, ".csv"), table.to_csv(index=False))
            written += [output(stem, ".md"), output(stem, ".csv")]
    return written
