"""Every headline with its uncertainty, from the run folders' per-example rows.

Two tables that :func:`capkv.results.tables.aggregate` writes beside the others, with the statistics of
:mod:`capkv.results.uncertainty` (stratified percentile bootstrap, fixed seed; paired bootstrap and
sign-flip test):

- ``intervals.csv``: per run, metric and level (``task``: the headline, the mean over subtasks;
  ``family``: a task family's subtasks; ``subtask``), the number of examples, the mean and its
  95% interval, examples resampled within their subtask (LongBench's dataset, RULER's subtask);
- ``paired.csv|md``: every method against CapKV at the same budget and against the full cache
  (a non-uniform allocation also against its own method's uniform budget), per task, budget,
  metric and level, on the examples both ran: the mean difference (method minus reference), its
  paired interval, the sign-flip p-value, and the examples won, lost and
  tied. A difference is ``better`` or ``worse`` when its interval excludes 0 and p < 0.05, else
  a ``tie``.

Scores are x 100, as in the other tables. Rows are taken in example-id order, so a cell's
intervals do not depend on how many shards wrote it or in which order its examples finished.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from capkv.results.format import markdown, with_interval
from capkv.results.metrics import run_reporting
from capkv.results.store import IDENTITY_KEYS, finished_rows, method_label, stored_config
from capkv.results.uncertainty import (
    CONFIDENCE,
    RESAMPLES,
    SEED,
    bootstrap_headlines,
    compare,
    examples_to_decide,
    mean_interval,
)

ALLOCATION_KEYS = ("allocation", "floor", "rounds")  # how a method spreads its budget
CAPKV = "capkv"
ALPHA = 0.05  # a difference is called better or worse only below this p-value
FULL = "full"
STATISTICS = (
    f"{100 * CONFIDENCE:g}% percentile bootstrap interval ({RESAMPLES} resamples of the examples "
    f"within each subtask, seed {SEED})"
)

# metric -> stratum (subtask, "" for a task without subtasks) -> example id -> score x 100
ExampleScores = dict[str, dict[str, dict[str, float]]]


def example_scores(run_dir: Path) -> ExampleScores:
    """Every example's scores (x 100) of one run folder, by metric and subtask."""
    scores: ExampleScores = defaultdict(lambda: defaultdict(dict))
    for row in finished_rows(run_dir):
        for metric, value in row["scores"].items():
            scores[metric][row.get("subtask") or ""][row["example_id"]] = 100 * value
    return scores


def families_of(path: Path, metrics: dict[str, Any]) -> dict[str, str]:
    """The family of each subtask of a run, as its task reports them (empty when unknown)."""
    reporting = run_reporting(path, metrics)
    return reporting.families if reporting is not None else {}


def levels(strata: list[str], family_of: dict[str, str]) -> Iterator[tuple[str, str, list[str]]]:
    """(level, group, subtasks) of a task's subtasks: the task, each family (``family_of``, a
    subtask without one its own family), each subtask."""
    yield "task", "average", strata
    if strata == [""]:
        return
    families: dict[str, list[str]] = defaultdict(list)
    for stratum in strata:
        families[family_of.get(stratum, stratum)].append(stratum)
    for family, members in families.items():
        yield "family", family, members
    for stratum in strata:
        yield "subtask", stratum, [stratum]


def in_id_order(by_id: dict[str, float]) -> list[float]:
    return [by_id[example_id] for example_id in sorted(by_id)]


def interval_table(runs: dict[Path, dict[str, Any]]) -> pd.DataFrame:
    """One row per run, metric and level: ``n``, ``mean``, ``low`` and ``high`` (from
    :func:`capkv.results.metrics.load_metrics`)."""
    records = []
    for path, metrics in runs.items():
        identity = {key: metrics[key] for key in IDENTITY_KEYS}
        family_of = families_of(path, metrics)
        for metric, strata in example_scores(path.parent).items():
            for level, group, members in levels(sorted(strata), family_of):
                interval = mean_interval({s: in_id_order(strata[s]) for s in members})
                records.append(
                    {
                        **identity,
                        "metric": metric,
                        "level": level,
                        "group": group,
                        "n": interval.n,
                        "mean": interval.mean,
                        "low": interval.low,
                        "high": interval.high,
                    }
                )
    columns = [*IDENTITY_KEYS, "metric", "level", "group", "n", "mean", "low", "high"]
    frame = pd.DataFrame.from_records(records, columns=columns)
    frame["budget_tokens"] = frame["budget_tokens"].astype("Int64")
    return frame


def average_interval(task_strata: list[dict[str, list[float]]]) -> tuple[float, float, float]:
    """Mean, low and high of the average of several tasks' headlines (each task's examples
    resampled within its subtasks, independently of the other tasks)."""
    samples = np.mean(
        [bootstrap_headlines(strata, seed=SEED + i) for i, strata in enumerate(task_strata)],
        axis=0,
    )
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    means = [np.mean([np.mean(v) for v in strata.values()]) for strata in task_strata]
    return float(np.mean(means)), float(low), float(high)


def average_table(runs: dict[Path, dict[str, Any]]) -> pd.DataFrame:
    """The interval of the main table's ``average`` (the mean of every task's headline metric) per (model, protocol, method label, budget) that ran every task."""
    tasks = sorted({m["task"] for m in runs.values()})
    groups: dict[tuple, dict[str, Path]] = defaultdict(dict)
    for path, m in runs.items():
        label = method_label(m["method"], m["variant"])
        groups[m["model"], m["protocol"], label, m["budget"]][m["task"]] = path
    records = []
    for (model, protocol, label, budget), by_task in groups.items():
        if sorted(by_task) != tasks:
            continue
        task_strata = []
        for task in tasks:
            path = by_task[task]
            reporting = run_reporting(path, runs[path])
            metric = reporting.headline if reporting else next(iter(runs[path]["scores"]))
            strata = example_scores(path.parent).get(metric, {})
            task_strata.append({s: in_id_order(values) for s, values in strata.items()})
        if not all(task_strata):  # a task whose rows are gone: no interval
            continue
        _, low, high = average_interval(task_strata)
        n = sum(len(values) for strata in task_strata for values in strata.values())
        records.append(
            {"model": model, "protocol": protocol, "method": label, "budget": budget}
            | {"low": low, "high": high, "n": n}
        )
    columns = ["model", "protocol", "method", "budget", "low", "high", "n"]
    return pd.DataFrame.from_records(records, columns=columns)


def verdict(low: float, high: float, p_value: float) -> str:
    """``better`` or ``worse`` when the interval excludes 0 and the test rejects "no difference"
    at :data:`ALPHA`, else ``tie``. Both are asked for because with few examples that differ
    (three wins and no loss) the percentile interval alone is too narrow."""
    if p_value >= ALPHA:
        return "tie"
    return "better" if low > 0 else "worse" if high < 0 else "tie"


PAIRED_FIELDS = ["n", "difference", "low", "high", "p_value", "wins", "losses", "ties", "verdict"]
PAIRED_FIELDS += ["n_to_decide"]  # examples that would decide the observed difference


def paired_fields(
    a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]
) -> dict[str, Any] | None:
    """A minus B paired over the examples both ran (stratum -> example id -> score, each;
    :func:`capkv.results.uncertainty.compare`): ``n``, ``difference``, ``low``, ``high``,
    ``p_value``, ``wins``, ``losses``, ``ties``, ``verdict`` (:func:`verdict`) and
    ``n_to_decide`` (:func:`capkv.results.uncertainty.examples_to_decide`): the fields every
    paired table holds (:data:`PAIRED_FIELDS`); None where they share no example."""
    try:
        result = compare(a, b)
    except ValueError:
        return None
    difference = result.difference
    return {
        "n": difference.n,
        "difference": difference.mean,
        "low": difference.low,
        "high": difference.high,
        "p_value": result.p_value,
        "wins": result.wins,
        "losses": result.losses,
        "ties": result.ties,
        "verdict": verdict(difference.low, difference.high, result.p_value),
        "n_to_decide": examples_to_decide(difference),
    }


def allocation_free(run_dir: Path) -> tuple[str, bool] | None:
    """A run's method section without its allocation keys (as sorted JSON-like text), and whether
    its allocation is the uniform one; None for a folder without a config."""
    config = stored_config(run_dir)
    if config is None:
        return None
    method = config["method"]
    uniform = method.get("allocation", "uniform") == "uniform" and method.get("rounds", 1) == 1
    rest = {key: value for key, value in method.items() if key not in ALLOCATION_KEYS}
    return repr(sorted(rest.items())), uniform


def uniform_counterparts(runs: dict[Path, dict[str, Any]]) -> dict[Path, Path]:
    """Each run with a non-uniform allocation (head-adaptive, model-wide or iterative; Ada-KV,
    arXiv 2407.11550) -> the run of the same method, task, protocol and budget with a uniform
    one, where the folder holds it."""
    uniform, allocated = {}, {}
    for path, m in runs.items():
        method = allocation_free(path.parent)
        if method is None:
            continue
        key = (m["model"], m["task"], m["protocol"], m["variant"], m["budget"], method[0])
        (uniform if method[1] else allocated)[path] = key
    by_key = {key: path for path, key in uniform.items()}
    return {path: by_key[key] for path, key in allocated.items() if key in by_key}


def reference_runs(
    runs: dict[Path, dict[str, Any]],
) -> Iterator[tuple[dict[str, Any], Path, dict[str, Any], Path]]:
    """(run, its folder, reference run, its folder) pairs: every run against CapKV at its budget,
    against the full cache (of its protocol, or of another where its own has none) and, for a
    non-uniform allocation of another method, against that method's uniform budget."""
    by_identity = {
        (m["model"], m["task"], m["protocol"], m["method"], m["variant"], m["budget"]): path
        for path, m in runs.items()
    }
    counterparts = uniform_counterparts(runs)
    full_protocols = defaultdict(list)
    for m in runs.values():
        if m["method"] == FULL and not m["variant"]:
            full_protocols[m["model"], m["task"]].append(m["protocol"])
    for path, m in runs.items():
        key = (m["model"], m["task"], m["protocol"])
        capkv = by_identity.get((*key, CAPKV, "", m["budget"]))
        if capkv is not None and capkv != path:
            yield m, path, runs[capkv], capkv
        uniform = counterparts.get(path)
        if uniform is not None and uniform != capkv:
            yield m, path, runs[uniform], uniform
        protocols = full_protocols.get((m["model"], m["task"]))
        if protocols and m["method"] != FULL:
            protocol = m["protocol"] if m["protocol"] in protocols else min(protocols)
            full = by_identity[m["model"], m["task"], protocol, FULL, "", FULL]
            yield m, path, runs[full], full


def paired_table(runs: dict[Path, dict[str, Any]]) -> pd.DataFrame:
    """Every run against its references (:func:`reference_runs`), per metric and level, on the
    examples both ran."""
    records = []
    cache: dict[Path, ExampleScores] = {}
    for m, path, reference, reference_path in reference_runs(runs):
        for folder in (path, reference_path):
            if folder not in cache:
                cache[folder] = example_scores(folder.parent)
        ours, theirs = cache[path], cache[reference_path]
        identity = {key: m[key] for key in IDENTITY_KEYS}
        family_of = families_of(path, m)
        for metric in [metric for metric in ours if metric in theirs]:
            for level, group, members in levels(sorted(ours[metric]), family_of):
                a = {s: ours[metric][s] for s in members}
                b = {s: theirs[metric].get(s, {}) for s in members}
                fields = paired_fields(a, b)
                if fields is None:  # no example in common
                    continue
                records.append(
                    {**identity, "reference": reference["method"], "metric": metric}
                    | {"level": level, "group": group, **fields}
                )
    columns = [*IDENTITY_KEYS, "reference", "metric", "level", "group", *PAIRED_FIELDS]
    frame = with_paired_types(pd.DataFrame.from_records(records, columns=columns))
    frame["budget_tokens"] = frame["budget_tokens"].astype("Int64")
    return frame


def with_paired_types(frame: pd.DataFrame) -> pd.DataFrame:
    """A paired table with ``n_to_decide`` as whole numbers (empty where no number decides)."""
    frame["n_to_decide"] = frame["n_to_decide"].astype("Int64")
    return frame


def paired_columns(frame: pd.DataFrame) -> dict[str, Any]:
    """How a paired comparison reads in a Markdown table: the difference with its interval, the
    sign-flip p, the examples won, lost and tied, the verdict, and the examples that would
    decide the observed difference (one home for every paired table: :mod:`capkv.results.turns`
    and :mod:`capkv.results.frontier` too)."""
    return {
        "difference [95% CI]": [
            with_interval(*values)
            for values in zip(frame["difference"], frame["low"], frame["high"], strict=True)
        ],
        "p": [f"{p:.3f}" for p in frame["p_value"]],
        "won/lost/tied": [
            f"{w}/{lo}/{t}"
            for w, lo, t in zip(frame["wins"], frame["losses"], frame["ties"], strict=True)
        ],
        "verdict": frame["verdict"],
        "examples to decide": [decide_text(n) for n in frame["n_to_decide"]],
    }


def decide_text(needed: Any) -> str:
    """``n_to_decide`` as a table shows it: a count, or "never" for a difference of 0."""
    return "never" if pd.isna(needed) else str(int(needed))


def paired_markdown(paired: pd.DataFrame) -> str:
    """The paired table in Markdown: differences with their intervals, task and family levels."""
    if paired.empty:
        return "(no pairs yet)\n"
    shown = paired[paired["level"] != "subtask"]
    table = pd.DataFrame(
        {
            "model": shown["model"],
            "task": shown["task"],
            "protocol": shown["protocol"],
            "budget": shown["budget"],
            "metric": shown["metric"],
            "group": shown["group"],
            "method": [
                method_label(m, v) for m, v in zip(shown["method"], shown["variant"], strict=True)
            ],
            "against": shown["reference"],
            "n": shown["n"],
            **paired_columns(shown),
        }
    )
    caption = (
        f"Method minus reference on the same examples (scores 0-100); {STATISTICS.replace('resamples', 'paired resamples')}; "
        f"p: two-sided sign-flip permutation test ({RESAMPLES} flips); better or worse: the "
        f"interval excludes 0 and p < {ALPHA:g}; otherwise a tie. Per-subtask rows are in "
        "paired.csv.\n\n"
    )
    return caption + markdown(table)
