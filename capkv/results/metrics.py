"""A run's ``metrics.json``: its scores summarized from its rows, written after every row, read
back (older files completed from their config), and which runs the ranked tables hold.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from capkv.results.store import (
    IDENTITY_KEYS,
    METRICS,
    RUNS,
    stored_config,
)
from capkv.storage.files import write_atomically
from capkv.tasks import long_generation, perplexity
from capkv.tasks.base import Reporting, task_reporting

log = logging.getLogger(__name__)

DIAGNOSTICS = ("capacity_fraction", "attention_error")  # see capkv.analysis.diagnostics


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
    by perplexity, perplexities pooled over its texts (:func:`capkv.tasks.perplexity.summarize`)."""

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
    perplexity (lower is better, unbounded) and those of long generation (compared with the
    full cache's continuations), which have tables of their own
    (:func:`capkv.results.perplexity.perplexity_table`,
    :func:`capkv.results.long_generation.comparison_table`) instead of the main table, its
    average, the intervals and the paired comparisons."""

    return {path: m for path, m in runs.items() if not has_own_table(m)}


def has_own_table(metrics: dict[str, Any]) -> bool:
    """Whether a run's scores are tabled apart from the ranked tables (perplexity, long
    generation)."""
    return is_perplexity(metrics) or is_long_generation(metrics)


def is_long_generation(metrics: dict[str, Any]) -> bool:
    """Whether a run's ``metrics.json`` is of long generation (its task's reporting says so)."""
    return metrics.get("benchmark") == long_generation.BENCHMARK


def is_perplexity(metrics: dict[str, Any]) -> bool:
    """Whether a run's ``metrics.json`` holds perplexities (its task's reporting says so)."""
    return metrics.get("benchmark") == perplexity.BENCHMARK
