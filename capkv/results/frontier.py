"""Score against KV bytes: which method and bit width wins at each byte budget.

Evicting tokens and storing the kept ones in fewer bits both shrink the cache; quantized caches
after KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
arXiv 2402.02750) hold more tokens in the same bytes (:mod:`capkv.engine.quantization`). A run
whose rows record the bytes its cache held (``kv_fraction_held``, ``kv_bytes_per_head_layer``:
a quantized run, or any run of a byte budget, :mod:`capkv.engine.kv_bytes`) is byte-measured;
runs whose rows lack them are left out.

Two tables, written by :func:`capkv.results.tables.aggregate` only where such runs are:

- ``frontier.csv|md``: per byte-measured run, its storage and bits per stored value, the task's
  headline score x 100 with its 95% percentile bootstrap interval (the examples resampled within
  their subtask, as ``intervals.csv`` does), the mean bytes it held, and whether it is on the
  Pareto front of its model, task and protocol: no other run holds at most as many bytes (mean
  ``kv_fraction_held``) with a higher score, or fewer bytes with an equal one;
- ``frontier_paired.csv|md``: per byte budget (``kvfrac*``, ``kvbytes*``) of a model, task and
  protocol, the candidates are its runs and every full-cache run whose mean bytes fit it (a
  quantized full cache may); the best by score (ties: fewer bytes) is the reference. (a)
  ``vs_best``: every other candidate minus the best; (b) ``vs_capkv_same_storage``: each
  method of the budget minus CapKV of the same variant (so the same storage) at the same budget.
  Each paired over the examples both ran: the mean difference, its paired bootstrap interval,
  the sign-flip p-value, wins, losses and ties, and the verdict of
  :func:`capkv.results.comparisons.verdict` (:mod:`capkv.results.uncertainty`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from capkv.engine.quantization import CacheQuantization
from capkv.models.support import DTYPES
from capkv.results.comparisons import (
    ALPHA,
    CAPKV,
    PAIRED_FIELDS,
    STATISTICS,
    example_scores,
    in_id_order,
    paired_columns,
    paired_fields,
    with_paired_types,
)
from capkv.results.format import interval_markdown, markdown, with_identity_types
from capkv.results.order import run_order
from capkv.results.store import (
    FULL_BUDGET,
    IDENTITY_KEYS,
    finished_rows,
    method_label,
    stored_config,
)
from capkv.results.turns import headline_metric
from capkv.results.uncertainty import RESAMPLES, Interval, mean_interval

TABLE = "frontier"  # frontier.csv, frontier.md: folders with byte-measured runs only
PAIRED = "frontier_paired"  # frontier_paired.csv, frontier_paired.md: likewise
VS_BEST = "vs_best"
VS_CAPKV = "vs_capkv_same_storage"
HELD = "kv_fraction_held"  # bytes held as a share of the prompt's 16-bit cache
PER_HEAD_LAYER = "kv_bytes_per_head_layer"
# A byte budget's label prefix -> its key in config.yaml and the row field it bounds.
BYTE_BUDGETS = {"kvfrac": ("kv_fraction", HELD), "kvbytes": ("kv_bytes", PER_HEAD_LAYER)}
FRONTIER_COLUMNS = ["storage", "bits", "metric", "n", "score", "low", "high", HELD]
FRONTIER_COLUMNS += [PER_HEAD_LAYER, "pareto"]
PAIRED_COLUMNS = ["byte_budget", "storage", "bits", "comparison", "reference", "metric"]
PAIRED_COLUMNS += PAIRED_FIELDS


@dataclass
class ByteRun:
    """One byte-measured run.

    Attributes
    ----------
    metrics : dict
        The run's ``metrics.json``.
    config : dict
        Its ``config.yaml``.
    metric : str
        The task's headline score.
    scores : dict
        Subtask ("" for a task without subtasks) -> example id -> headline score x 100.
    interval : Interval
        The headline and its interval.
    held : dict
        :data:`HELD` and :data:`PER_HEAD_LAYER`, each its mean over the run's rows.
    """

    metrics: dict[str, Any]
    config: dict[str, Any]
    metric: str
    scores: dict[str, dict[str, float]]
    interval: Interval
    held: dict[str, float]

    @property
    def label(self) -> str:
        """The run's method and variant as tables show them (``capkv-q4-hqq``)."""
        return method_label(self.metrics["method"], self.metrics["variant"])

    @property
    def group(self) -> tuple[str, str, str]:
        """The (model, task, protocol) whose runs share a front."""
        return self.metrics["model"], self.metrics["task"], self.metrics["protocol"]

    def storage(self) -> tuple[str, int | None]:
        """How the run stored its cache (``none``, ``bf16``, ``hqq``, ...) and the bits per
        stored value: the ``cache:`` section's, or without one the model dtype's (None where
        it is unknown, such as ``auto``)."""
        cache = self.config.get("cache")
        settings = CacheQuantization(cache["quantization"], cache.get("nbits")) if cache else None
        if settings is not None and settings.active:
            return settings.quantization, settings.bits
        dtype = DTYPES.get(str(self.config["model"].get("dtype")))
        return "none", torch.finfo(dtype).bits if isinstance(dtype, torch.dtype) else None


def byte_run(path: Path, metrics: dict[str, Any]) -> ByteRun | None:
    """The run whose ``metrics.json`` is at ``path``, byte-measured; None when its rows record
    no bytes (or it has no ``config.yaml``)."""
    rows = [row for row in finished_rows(path.parent) if HELD in row]
    config = stored_config(path.parent)
    if not rows or config is None:
        return None
    metric = headline_metric(path, metrics)
    strata = example_scores(path.parent).get(metric, {})
    if not strata:
        return None
    interval = mean_interval({s: in_id_order(strata[s]) for s in sorted(strata)})
    held = {key: float(np.mean([row[key] for row in rows])) for key in (HELD, PER_HEAD_LAYER)}
    return ByteRun(metrics, config, metric, dict(strata), interval, held)


def byte_runs(runs: dict[Path, dict[str, Any]]) -> list[ByteRun]:
    """Every byte-measured run among ``runs`` (from :func:`capkv.results.metrics.ranked_runs`),
    in the tables' order (:func:`capkv.results.order.run_order`)."""
    found = []
    for path, metrics in sorted(runs.items(), key=lambda item: run_order(item[1])):
        run = byte_run(path, metrics)
        if run is not None:
            found.append(run)
    return found


def dominates(other: ByteRun, run: ByteRun) -> bool:
    """Whether ``other`` holds at most as many bytes as ``run`` with a higher score, or fewer
    bytes with an equal score."""
    bytes_, score = other.held[HELD], other.interval.mean
    mine, my_score = run.held[HELD], run.interval.mean
    return (bytes_ <= mine and score > my_score) or (bytes_ < mine and score == my_score)


def on_front(run: ByteRun, found: list[ByteRun]) -> bool:
    """Whether no run of the same model, task and protocol dominates ``run``."""
    return not any(other.group == run.group and dominates(other, run) for other in found)


def frontier_table(found: list[ByteRun]) -> pd.DataFrame:
    """One row per byte-measured run: its identity, ``storage``, ``bits``, ``metric`` (the
    headline), ``n``, ``score`` (x 100) and its interval ``low``, ``high``, the mean bytes held
    (:data:`HELD`, :data:`PER_HEAD_LAYER`) and ``pareto``."""
    records = []
    for run in found:
        storage, bits = run.storage()
        interval = run.interval
        records.append(
            {key: run.metrics[key] for key in IDENTITY_KEYS}
            | {"storage": storage, "bits": bits, "metric": run.metric, "n": interval.n}
            | {"score": interval.mean, "low": interval.low, "high": interval.high}
            | run.held
            | {"pareto": on_front(run, found)}
        )
    frame = pd.DataFrame.from_records(records, columns=[*IDENTITY_KEYS, *FRONTIER_COLUMNS])
    frame["bits"] = frame["bits"].astype("Int64")
    frame["pareto"] = frame["pareto"].astype(bool)
    return with_identity_types(frame)


def byte_budget_of(run: ByteRun) -> tuple[str, float] | None:
    """The row field a run's byte budget bounds and its bound (``kv_fraction_held`` <= 0.25 for
    ``kvfrac0.25``, from its ``config.yaml``); None for a run of another budget."""
    for prefix, (key, field) in BYTE_BUDGETS.items():
        if run.metrics["budget"].startswith(prefix) and run.config.get(key) is not None:
            return field, float(run.config[key])
    return None


def byte_budgets(found: list[ByteRun]) -> dict[tuple, list[ByteRun]]:
    """(model, task, protocol, budget label) -> the candidates at that byte budget: its runs,
    then every full-cache run of the same model, task and protocol whose mean bytes fit it."""
    budgets: dict[tuple, list[ByteRun]] = {}
    bounds: dict[tuple, tuple[str, float]] = {}
    for run in found:
        bound = byte_budget_of(run)
        if bound is not None:
            key = (*run.group, run.metrics["budget"])
            budgets.setdefault(key, []).append(run)
            bounds[key] = bound
    for key, runs in budgets.items():
        field, limit = bounds[key]
        full = [r for r in found if r.group == key[:3] and r.metrics["budget"] == FULL_BUDGET]
        runs += [r for r in full if r.held[field] <= limit]
    return budgets


def best_of(candidates: list[ByteRun]) -> ByteRun:
    """The candidate with the highest score; of equal scores, the one holding fewer bytes."""
    return min(candidates, key=lambda run: (-run.interval.mean, run.held[HELD]))


def paired_record(
    run: ByteRun, reference: ByteRun, budget: str, comparison: str
) -> dict[str, Any] | None:
    """One row of ``frontier_paired``: ``run`` minus ``reference`` paired over the examples
    both ran; None where they share none or score different headlines."""
    fields = paired_fields(run.scores, reference.scores) if run.metric == reference.metric else None
    if fields is None:
        return None
    storage, bits = run.storage()
    return {key: run.metrics[key] for key in IDENTITY_KEYS} | {
        "byte_budget": budget,
        "storage": storage,
        "bits": bits,
        "comparison": comparison,
        "reference": reference.label,
        "metric": run.metric,
        **fields,
    }


def budget_records(budget: str, candidates: list[ByteRun]) -> list[dict[str, Any] | None]:
    """The rows of one byte budget: every candidate but the best against the best, then each
    method of the budget against CapKV of its variant (its storage)."""
    best = best_of(candidates)
    records = [paired_record(run, best, budget, VS_BEST) for run in candidates if run is not best]
    own = [run for run in candidates if run.metrics["budget"] == budget]
    capkv = {run.metrics["variant"]: run for run in own if run.metrics["method"] == CAPKV}
    for run in own:
        reference = capkv.get(run.metrics["variant"])
        if run.metrics["method"] != CAPKV and reference is not None:
            records.append(paired_record(run, reference, budget, VS_CAPKV))
    return records


def paired_frontier_table(found: list[ByteRun]) -> pd.DataFrame:
    """Per byte budget (:func:`byte_budgets`), its paired rows (:func:`budget_records`)."""
    records = [
        record
        for (*_, budget), candidates in byte_budgets(found).items()
        for record in budget_records(budget, candidates)
        if record is not None
    ]
    frame = pd.DataFrame.from_records(records, columns=[*IDENTITY_KEYS, *PAIRED_COLUMNS])
    frame["bits"] = frame["bits"].astype("Int64")
    return with_identity_types(with_paired_types(frame))


def frontier_tables(runs: dict[Path, dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``frontier`` and ``frontier_paired`` (:func:`frontier_table`,
    :func:`paired_frontier_table`) of the byte-measured runs among ``runs`` (from
    :func:`capkv.results.metrics.ranked_runs`); both empty where there are none."""
    found = byte_runs(runs)
    return frontier_table(found), paired_frontier_table(found)


def bits_text(bits: Any) -> str:
    """Bits per value as a Markdown cell: ``4``, or blank where unknown."""
    return "" if pd.isna(bits) else str(int(bits))


def frontier_markdown(table: pd.DataFrame) -> str:
    """``frontier`` per model, task and protocol, runs by the bytes they held, each score as
    ``score [low, high]``, the front marked."""
    if table.empty:
        return "(no byte-measured runs yet)\n"
    table = table.sort_values(["model", "task", "protocol", HELD], kind="stable")
    labels = zip(table["method"], table["variant"], strict=True)
    shown = pd.DataFrame(
        {
            "model": table["model"],
            "task": table["task"],
            "protocol": table["protocol"],
            "method": [method_label(method, variant) for method, variant in labels],
            "budget": table["budget"],
            "storage": table["storage"],
            "bits": table["bits"].map(bits_text),
            "held": table[HELD].map(lambda held: f"{held:.3f}"),
            "bytes/head/layer": table[PER_HEAD_LAYER].map(lambda b: f"{b:.0f}"),
            "metric": table["metric"],
            "score": table["score"],
            "score low": table["low"],
            "score high": table["high"],
            "score n": table["n"],
            "front": table["pareto"].map({True: "yes", False: ""}),
        }
    )
    caption = (
        "Headline score 0-100 against the KV bytes held: mean [" + STATISTICS + "]; held: the "
        "mean bytes the cache held as a share of the prompt's full cache at 16 bits per value; "
        "bits: per stored value; front: on the Pareto front of its model, task and protocol (no "
        "run holds at most as many bytes with a higher score, or fewer with an equal one).\n\n"
    )
    return caption + interval_markdown(shown, ["score"])


def best_per_budget(paired: pd.DataFrame) -> str:
    """``model · task · protocol · budget: best``, for each byte budget of ``paired``."""
    best = paired[paired["comparison"] == VS_BEST]
    keys = ["model", "task", "protocol", "byte_budget"]
    pairs = best.groupby(keys, sort=False)["reference"].first().items()
    return "; ".join(f"{' · '.join(key)}: {reference}" for key, reference in pairs)


def paired_frontier_markdown(paired: pd.DataFrame) -> str:
    """``frontier_paired`` in Markdown: each difference with its interval, p and
    won/lost/tied, and the best combination per byte budget in the caption."""
    if paired.empty:
        return "(no pairs yet)\n"
    labels = zip(paired["method"], paired["variant"], strict=True)
    table = pd.DataFrame(
        {
            "model": paired["model"],
            "task": paired["task"],
            "protocol": paired["protocol"],
            "byte budget": paired["byte_budget"],
            "method": [method_label(method, variant) for method, variant in labels],
            "budget": paired["budget"],
            "bits": paired["bits"].map(bits_text),
            "comparison": paired["comparison"],
            "against": paired["reference"],
            "n": paired["n"],
            **paired_columns(paired),
        }
    )
    caption = (
        "Paired differences of the headline score (0-100) at each byte budget. Candidates: the "
        "budget's runs and every full-cache run whose mean bytes fit it; the best has the "
        f"highest score (of equal scores, the fewer bytes). {VS_BEST}: the candidate minus the "
        f"best; {VS_CAPKV}: the method minus CapKV of the same storage at the same budget; both "
        f"on the examples both ran (n). {STATISTICS.replace('resamples', 'paired resamples')}; "
        f"p: two-sided sign-flip permutation test ({RESAMPLES} flips); better or worse: the "
        f"interval excludes 0 and p < {ALPHA:g}; otherwise a tie. Best per budget: "
        f"{best_per_budget(paired) or '(no budget with two candidates)'}.\n\n"
    )
    return caption + markdown(table)
