"""Where runs write, how they resume, and how all runs become tables.

One run = one (model, task, method, budget, protocol) cell, in its own directory::

    <results>/runs/<model>/<task>/<method>/<budget>/<protocol>/
        examples.jsonl   one row per finished example, appended and flushed as it finishes
                         (shard i of N > 1 appends to examples.shard-i-of-N.jsonl instead)
        metrics.json     mean scores (x 100) overall and per subtask over the rows of every
                         rows file, with how many examples the cell holds of how many
        config.yaml      the resolved config, written before the first row

A rerun skips the examples already in any rows file of the cell, whatever shard count wrote
them; a killed run loses at most the example in flight. :func:`aggregate` collects every
``metrics.json`` (and the needle rows) into ``<results>/*.csv`` and ``<results>/*.md``, with
every score's interval and the paired comparisons of :mod:`capkv.comparisons`
(``python -m capkv.results [results]``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import secrets
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from capkv.budget import Budget
from capkv.locking import locked
from capkv.tasks.base import Reporting, task_reporting
from capkv.uncertainty import CONFIDENCE, RESAMPLES, SEED

log = logging.getLogger(__name__)

RUNS = "runs"
EXAMPLES = "examples.jsonl"
ROWS_GLOB = "examples*.jsonl"  # examples.jsonl and every examples.shard-i-of-N.jsonl
TABLES_LOCK = ".tables.lock"
METRICS = "metrics.json"
CONFIG = "config.yaml"
DIAGNOSTICS = ("capacity_fraction", "attention_error")  # see capkv.diagnostics
# What one run is, as separate fields: ``method`` is the method's name (its conf/method option),
# ``variant`` the name given to other hyperparameters (empty by default), ``budget_tokens`` and
# ``ratio`` the budget (at most one set; neither for the full cache). ``budget`` is the budget's
# label (``budget512``, ``ratio0.5``, ``full``): a folder name and a display, never parsed.
IDENTITY_KEYS = [
    "model",
    "task",
    "method",
    "variant",
    "budget",
    "budget_tokens",
    "ratio",
    "protocol",
]
RUN_KEYS = ["model", "task", "method", "variant", "budget", "protocol"]  # one run, as table keys
FULL_BUDGET = "full"  # the budget label of a run that evicts nothing


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written).

    The file gets the permissions a plain ``open`` would give it (0666 less the umask).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def method_label(method: str, variant: str) -> str:
    """``capkv``, or ``capkv-tau3`` for variant ``tau3``: a run's folder name and display."""
    return f"{method}-{variant}" if variant else method


def run_identity(
    model: str, task: str, method: str, variant: str, budget: Budget | None, protocol: str
) -> dict[str, Any]:
    """The identity fields of one run (:data:`IDENTITY_KEYS`); ``budget`` None is no eviction."""
    return {
        "model": model,
        "task": task,
        "method": method,
        "variant": str(variant or ""),
        "budget": budget.label if budget is not None else FULL_BUDGET,
        "budget_tokens": budget.tokens if budget is not None else None,
        "ratio": budget.ratio if budget is not None else None,
        "protocol": protocol,
    }


def run_directory(
    results_dir: str | Path, model: str, task: str, method: str, budget: str, protocol: str
) -> Path:
    """The directory of one run (``method`` is its label, :func:`method_label`); names are made
    path-safe (``/`` becomes ``--``)."""
    parts = [model, task, method, budget, protocol]
    return Path(results_dir, RUNS, *(part.replace("/", "--") for part in parts))


def identity_directory(results_dir: str | Path, identity: dict[str, Any]) -> Path:
    """The directory of the run with ``identity`` (from :func:`run_identity`)."""
    label = method_label(identity["method"], identity["variant"])
    parts = (identity["model"], identity["task"], label, identity["budget"], identity["protocol"])
    return run_directory(results_dir, *parts)


def rows_files(run_dir: Path) -> list[Path]:
    """Every rows file of a cell: ``examples.jsonl`` first, then the shards' files."""
    return sorted(Path(run_dir).glob(ROWS_GLOB))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of one rows file, each valid one kept wherever it is in the file.

    A damaged line (a run killed mid-write, a line edited by hand) is reported with the file and
    line number and skipped; its example runs again, and the next write of the file leaves the
    line out. A row repeating an example already read is skipped too.
    """
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = []
    seen = set()
    with path.open("rb") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                row = None
            if not isinstance(row, dict) or "example_id" not in row:
                log.warning(
                    "%s, line %d, is not a result row (damaged or cut short); it is skipped and "
                    "its example runs again.",
                    path,
                    number,
                )
                continue
            if row["example_id"] not in seen:
                seen.add(row["example_id"])
                rows.append(row)
    return rows


def stored_config(run_dir: Path) -> dict[str, Any] | None:
    """The ``config.yaml`` of a run folder (None when it has none yet).

    Raises
    ------
    ValueError
        If the file is not a YAML mapping with model, method and task sections.
    """
    path = run_dir / CONFIG
    if not path.exists():
        return None
    try:
        stored = OmegaConf.to_container(OmegaConf.load(path))
    except (yaml.YAMLError, UnicodeDecodeError, OmegaConfBaseException) as error:
        problem = f"is not a valid config ({str(error).splitlines()[0]})"
    else:
        if isinstance(stored, dict) and all(
            isinstance(stored.get(section), dict) for section in ("model", "method", "task")
        ):
            return stored
        problem = "lacks the model, method and task sections"
    raise ValueError(
        f"{path} {problem}, so what the rows beside it were run with is unknown; delete the "
        f"folder {run_dir} to rerun that cell."
    )


def finished_rows(run_dir: Path, order: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of a cell from all its rows files, each example once (two runs with different
    shard counts may both have finished it; their rows are equal but for ``seconds``).

    With ``order`` (example ids, e.g. the task's), rows follow it, so that a cell run as N shards
    yields its rows in the order of the unsharded run; rows of other ids follow in file order.
    """
    rows: dict[str, dict[str, Any]] = {}
    for path in rows_files(run_dir):
        for row in read_rows(path):
            rows.setdefault(row["example_id"], row)
    if order is None:
        return list(rows.values())
    rank = {example_id: i for i, example_id in enumerate(order)}
    return sorted(rows.values(), key=lambda row: rank.get(row["example_id"], len(rank)))


class ExampleLog:
    """Appends one JSON row per example and flushes it to disk at once."""

    def __init__(self, path: Path, rows: list[dict[str, Any]]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Rewrite the valid rows so a torn last line never stays in the file.
        write_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))
        self._stream = path.open("a")

    def append(self, row: dict[str, Any]) -> None:
        self._stream.write(json.dumps(row) + "\n")
        self._stream.flush()
        os.fsync(self._stream.fileno())

    def close(self) -> None:
        self._stream.close()


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of every score (x 100) overall and per subtask; the overall mean of a task with
    subtasks is the mean over subtasks (LongBench's average), not over examples."""
    by_subtask: dict[str, list[dict[str, float]]] = defaultdict(list)
    for row in rows:
        by_subtask[row.get("subtask") or ""].append(row["scores"])

    def mean_scores(score_rows: list[dict[str, float]]) -> dict[str, float]:
        names = list(score_rows[0]) if score_rows else []
        return {n: 100 * sum(r[n] for r in score_rows) / len(score_rows) for n in names}

    subtasks = {name: mean_scores(scores) for name, scores in sorted(by_subtask.items()) if name}
    if subtasks:
        names = list(next(iter(subtasks.values())))
        overall = {n: sum(s[n] for s in subtasks.values()) / len(subtasks) for n in names}
    else:
        overall = mean_scores(by_subtask.get("", []))
    return {"n_examples": len(rows), "scores": overall, "subtasks": subtasks}


def summary(rows: list[dict[str, Any]], reporting: Reporting | None) -> dict[str, Any]:
    """The scores ``metrics.json`` holds: means x 100 (:func:`summarize`), or for a task scored
    by perplexity, perplexities pooled over its texts (:func:`capkv.perplexity.summarize`)."""
    from capkv import perplexity  # it reads run folders with this module's functions

    if reporting is not None and reporting.benchmark == perplexity.BENCHMARK:
        return perplexity.summarize(rows)
    return summarize(rows)


def write_metrics(
    run_dir: Path,
    identity: dict[str, Any],
    rows: list[dict[str, Any]],
    n_expected: int | None = None,
    reporting: Reporting | None = None,
) -> dict:
    """Write ``metrics.json`` for the rows so far; returns what was written.

    ``n_expected`` is how many examples the whole cell (every shard) runs; a cell holding fewer
    rows is reported as incomplete by :func:`aggregate`. ``reporting`` (the task's benchmark,
    headline score and subtask families) is saved for the tables.
    """
    kept = [sum(r["kept_tokens_per_layer"]) / len(r["kept_tokens_per_layer"]) for r in rows]
    prompt = [r["prompt_tokens"] for r in rows]
    measured = [row["diagnostics"] for row in rows if "diagnostics" in row]
    metrics = {
        **identity,
        **(reporting.fields() if reporting is not None else {}),
        **summary(rows, reporting),
        "mean_prompt_tokens": sum(prompt) / len(prompt) if prompt else math.nan,
        "mean_kept_tokens": sum(kept) / len(kept) if kept else math.nan,
        "diagnostics": {
            name: sum(m[name] for m in measured) / len(measured) for name in measured[0]
        }
        if measured
        else {},
    }
    if n_expected is not None:
        metrics["n_expected"] = n_expected
    write_atomically(run_dir / METRICS, json.dumps(metrics, indent=2) + "\n")
    return metrics


METRICS_KEYS = (
    *IDENTITY_KEYS,
    "scores",
    "subtasks",
    "mean_prompt_tokens",
    "mean_kept_tokens",
)
ADDED_IDENTITY_KEYS = ("variant", "budget_tokens", "ratio")  # not in older metrics.json files


def identity_from_config(metrics: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The identity fields a ``metrics.json`` written before :data:`ADDED_IDENTITY_KEYS` existed
    lacks, from the structured ``config.yaml`` beside it (empty when there is none).

    Such a file's ``method`` is the folder's label; with an empty variant (every run that passed
    no ``variant=``) the label is the method's name.
    """
    try:
        stored = stored_config(run_dir)
    except ValueError:
        stored = None
    if stored is None or not all(key in stored for key in ("variant", "budget", "ratio")):
        return {}
    variant = str(stored["variant"] or "")
    method = str(metrics.get("method", "")).removesuffix(f"-{variant}" if variant else "")
    return {
        "method": method,
        "variant": variant,
        "budget_tokens": stored["budget"],
        "ratio": stored["ratio"],
    }


def read_metrics(path: Path) -> dict[str, Any] | None:
    """One ``metrics.json``; a damaged one is reported in one warning line and read as None.

    A file written before the identity fields :data:`ADDED_IDENTITY_KEYS` existed gets them from
    the ``config.yaml`` beside it (:func:`identity_from_config`).
    """
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        problem = f"is not valid JSON ({error})"
    else:
        if isinstance(metrics, dict) and any(key not in metrics for key in ADDED_IDENTITY_KEYS):
            metrics |= identity_from_config(metrics, path.parent)
        missing = [
            key for key in METRICS_KEYS if not isinstance(metrics, dict) or key not in metrics
        ]
        if not missing:
            return metrics
        problem = f"lacks {', '.join(missing)}"
    log.warning(
        "%s %s; that cell is left out of the tables. Rerun that cell to rewrite it, or delete "
        "the file.",
        path,
        problem,
    )
    return None


def load_metrics(results_dir: str | Path) -> dict[Path, dict[str, Any]]:
    """Every readable ``metrics.json`` under ``results_dir/runs`` by path (damaged ones are
    reported and skipped)."""
    paths = sorted(Path(results_dir, RUNS).rglob(METRICS))
    loaded = {path: read_metrics(path) for path in paths}
    return {path: metrics for path, metrics in loaded.items() if metrics is not None}


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


def run_reporting(metrics_path: Path, metrics: dict[str, Any]) -> Reporting | None:
    """How a run's task reports its scores: as saved in its ``metrics.json``, or, for runs
    written before it was saved, asked of the task its ``config.yaml`` describes; None when
    neither says (the headline is then the first score, and every subtask its own family)."""
    saved = Reporting.from_fields(metrics)
    if saved is not None:
        return saved
    try:
        config = stored_config(metrics_path.parent)
        return task_reporting(config["task"]) if config is not None else None
    except (ValueError, KeyError, ImportError):
        return None


def task_reportings(runs: dict[Path, dict[str, Any]]) -> dict[str, Reporting]:
    """The reporting of every task name in ``runs`` (from :func:`load_metrics`), the families of
    its runs merged."""
    merged: dict[str, Reporting] = {}
    for path, metrics in runs.items():
        reporting = run_reporting(path, metrics)
        if reporting is None:
            continue
        known = merged.get(metrics["task"])
        families = {**known.families, **reporting.families} if known else reporting.families
        merged[metrics["task"]] = Reporting(reporting.benchmark, reporting.headline, families)
    return merged


def with_identity_types(frame: pd.DataFrame) -> pd.DataFrame:
    """``budget_tokens`` as whole numbers (blank where a run has none), ``ratio`` as floats."""
    if "budget_tokens" in frame:
        frame["budget_tokens"] = frame["budget_tokens"].astype("Int64")
        frame["ratio"] = frame["ratio"].astype(float)
    return frame


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


def markdown(frame: pd.DataFrame, digits: dict[str, int] | None = None) -> str:
    """A Markdown table (pandas' to_markdown needs tabulate; this does not): floats with one
    decimal, or ``digits[column]`` decimals; missing values are left blank."""
    if frame.empty:
        return "(no runs yet)\n"
    columns = [str(c) for c in frame.columns]
    places = [(digits or {}).get(column, 1) for column in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for values in frame.itertuples(index=False):
        cells = [
            ("" if math.isnan(v) else f"{v:.{n}f}") if isinstance(v, float) else str(v)
            for v, n in zip(values, places, strict=True)
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def with_interval(mean: float, low: float, high: float) -> str:
    """``62.3 [55.1, 69.0]``: a mean and its interval; blank where the mean is missing."""
    if pd.isna(mean):
        return ""
    return f"{mean:.1f} [{low:.1f}, {high:.1f}]"


def interval_markdown(table: pd.DataFrame, columns: list[str]) -> str:
    """``table`` in Markdown, each of ``columns`` shown as ``mean [low, high]`` from its
    ``<column> low`` and ``<column> high`` columns; its ``<column> n`` goes in the header as
    ``(n=N)`` when every row has the same N, else into each cell."""
    extra = {f"{column} {part}" for column in columns for part in ("low", "high", "n")}
    shown = table[[c for c in table.columns if c not in extra]].copy()
    for column in columns:
        counts = table[f"{column} n"]
        uniform = counts.dropna().nunique() <= 1
        shown[column] = [
            with_interval(mean, low, high) + ("" if uniform or pd.isna(n) else f" (n={int(n)})")
            for mean, low, high, n in zip(
                table[column], table[f"{column} low"], table[f"{column} high"], counts, strict=True
            )
        ]
        if uniform and counts.notna().any():
            shown = shown.rename(columns={column: f"{column} (n={int(counts.dropna().iloc[0])})"})
    return markdown(shown)


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
    :mod:`capkv.comparisons`, each score column is followed by its interval and example count."""
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


def incomplete_cells(runs: dict[Path, dict[str, Any]]) -> list[str]:
    """One line per cell (from :func:`load_metrics`) that holds fewer examples than it runs (a
    shard missing or unfinished)."""
    lines = []
    for path, metrics in runs.items():
        expected = metrics.get("n_expected")
        if expected is not None and metrics["n_examples"] < expected:
            lines.append(
                f"{path.parent} holds {metrics['n_examples']} of {expected} examples "
                "(a shard is missing or unfinished; rerun it to complete the cell)"
            )
    return lines


def ranked_runs(runs: dict[Path, dict[str, Any]]) -> dict[Path, dict[str, Any]]:
    """The runs whose scores are in [0, 1], higher is better: every run but those scored by
    perplexity (lower is better, unbounded), which have a table of their own
    (:func:`capkv.perplexity.perplexity_table`) instead of the main table, its average, the
    intervals and the paired comparisons."""
    from capkv import perplexity

    return {path: m for path, m in runs.items() if not perplexity.is_perplexity(m)}


def aggregate(results_dir: str | Path) -> dict[str, pd.DataFrame]:
    """Write ``scores.csv/.md`` (every run), ``main_table.csv/.md`` (method x budget, headline
    score per task and task family), ``needle.csv`` and, where perplexity runs are,
    ``perplexity.csv/.md`` under ``results_dir``; return the frames.

    The tables are a function of the run folders alone. One process rebuilds them at a time (a
    lock in the results folder), so concurrent runs never drop each other's cells; a cell
    holding fewer examples than it runs is named in a warning and under the Markdown tables.
    """
    from capkv import comparisons, perplexity  # they read run folders with this module's functions

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
        }
        incomplete = incomplete_cells(runs)
        note = "".join(f"\nIncomplete: {line}.\n" for line in incomplete)
        texts = {
            "scores": markdown(scores),
            "main_table": main_table_markdown(table),
            "paired": comparisons.paired_markdown(frames["paired"]),
            "perplexity": perplexity.perplexity_markdown(frames["perplexity"]),
        }
        for name, frame in frames.items():
            if name == "perplexity" and frame.empty:  # only folders with perplexity runs
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
        if name == "perplexity" and frame.empty:
            continue
        markdown_too = name in ("scores", "main_table", "paired", "perplexity")
        print(f"  {Path(args.results, name)}.csv" + (" and .md" if markdown_too else ""))


if __name__ == "__main__":
    main()
