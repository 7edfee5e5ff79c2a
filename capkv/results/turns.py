"""Scores by turn: how a compressed context answers its first question and the later ones.

The shared-context protocols compress one context and ask several questions of it, one after
another, each fed after the compressed cache (SCBench's multi-request mode: Li et al. 2024,
"SCBench: A KV Cache-Centric Analysis of Long-Context Methods", arXiv 2412.10319). A compression
guided by the first question may keep what that question needs and lose what the later ones
need; these tables show it. Each row of such a run carries ``turn`` (1-based, in asking order),
``turns`` (questions asked of its context) and ``context`` (the example id of its context's
first question); runs whose rows lack them are left out.

Two tables, written by :func:`capkv.results.tables.aggregate` only where such runs are:

- ``turns.csv|md``: per run (model, task, protocol, method and variant, budget) and turn, the
  task's headline score x 100 with its 95% percentile bootstrap interval, the questions resampled
  within their subtask, as ``intervals.csv`` does (:mod:`capkv.results.comparisons`);
- ``turns_paired.csv|md``: (a) ``turn1_vs_later``: per run, turn 1 against the later turns,
  paired over contexts (per context: its turn-1 score minus the mean of its later turns' scores);
  (b) ``vs_capkv_later``: every method against CapKV at the same budget and protocol (CapKV of
  the run's own variant where it ran, else plain CapKV; a CapKV variant against plain CapKV) on
  the later turns (turn >= 2), paired over the same questions. Each: the mean difference, its
  paired bootstrap interval, the sign-flip p-value, wins, losses and ties, and the verdict of
  :func:`capkv.results.comparisons.verdict` (:mod:`capkv.results.uncertainty`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from capkv.results.comparisons import (
    ALPHA,
    CAPKV,
    PAIRED_FIELDS,
    STATISTICS,
    in_id_order,
    paired_columns,
    paired_fields,
    with_paired_types,
)
from capkv.results.format import interval_markdown, markdown, with_identity_types
from capkv.results.metrics import run_reporting
from capkv.results.order import run_order
from capkv.results.store import IDENTITY_KEYS, finished_rows, method_label
from capkv.results.uncertainty import RESAMPLES, mean_interval

TABLE = "turns"  # turns.csv, turns.md: folders with shared-context runs only
PAIRED = "turns_paired"  # turns_paired.csv, turns_paired.md: likewise
TURN_VS_LATER = "turn1_vs_later"
VS_CAPKV = "vs_capkv_later"
LATER = "later turns"  # the reference of a turn-1 comparison
TURN_COLUMNS = ["metric", "turn", "n", "score", "low", "high"]
PAIRED_COLUMNS = ["comparison", "reference", "metric", *PAIRED_FIELDS]


@dataclass
class TurnScores:
    """The headline score (x 100) of every question of one shared-context run.

    Attributes
    ----------
    metrics : dict
        The run's ``metrics.json``.
    metric : str
        The task's headline score.
    by_turn : dict
        Turn -> subtask ("" for a task without subtasks) -> example id -> score.
    contexts : dict
        Context id -> (its subtask, turn -> score).
    """

    metrics: dict[str, Any]
    metric: str
    by_turn: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    contexts: dict[str, tuple[str, dict[int, float]]] = field(default_factory=dict)

    def later(self) -> dict[str, dict[str, float]]:
        """Subtask -> example id -> score of every question after the first of its context."""
        merged: dict[str, dict[str, float]] = defaultdict(dict)
        for turn, strata in self.by_turn.items():
            if turn >= 2:
                for stratum, scores in strata.items():
                    merged[stratum] |= scores
        return dict(merged)

    def first_and_rest(self) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
        """Subtask -> context -> its turn-1 score, and -> the mean of its later turns' scores,
        for every context asked its first question and at least one more."""
        first: dict[str, dict[str, float]] = defaultdict(dict)
        rest: dict[str, dict[str, float]] = defaultdict(dict)
        for context, (stratum, scores) in self.contexts.items():
            later = [score for turn, score in scores.items() if turn >= 2]
            if 1 in scores and later:
                first[stratum][context] = scores[1]
                rest[stratum][context] = float(np.mean(later))
        return dict(first), dict(rest)


def headline_metric(path: Path, metrics: dict[str, Any]) -> str:
    """The score a run's task reports as its headline (its first score where unknown)."""
    reporting = run_reporting(path, metrics)
    return reporting.headline if reporting is not None else next(iter(metrics["scores"]), "")


def turn_scores(path: Path, metrics: dict[str, Any]) -> TurnScores | None:
    """The headline score of each question of the run whose ``metrics.json`` is at ``path``;
    None when none of its rows carries a ``turn`` (a run of another protocol)."""
    rows = [row for row in finished_rows(path.parent) if "turn" in row]
    if not rows:
        return None
    scores = TurnScores(metrics, headline_metric(path, metrics))
    for row in rows:
        if scores.metric not in row["scores"]:
            continue
        value = 100 * row["scores"][scores.metric]
        stratum = row.get("subtask") or ""
        turn = int(row["turn"])
        scores.by_turn.setdefault(turn, {}).setdefault(stratum, {})[row["example_id"]] = value
        context = str(row.get("context", row["example_id"]))
        scores.contexts.setdefault(context, (stratum, {}))[1][turn] = value
    return scores


def shared_runs(runs: dict[Path, dict[str, Any]]) -> dict[Path, TurnScores]:
    """Every shared-context run among ``runs`` (from :func:`capkv.results.metrics.ranked_runs`),
    in the tables' order (:func:`capkv.results.order.run_order`)."""
    found = {}
    for path, metrics in sorted(runs.items(), key=lambda item: run_order(item[1])):
        scores = turn_scores(path, metrics)
        if scores is not None:
            found[path] = scores
    return found


def turn_table(shared: dict[Path, TurnScores]) -> pd.DataFrame:
    """One row per shared-context run and turn: its identity, ``metric`` (the headline),
    ``turn``, ``n`` (questions at that turn), ``score`` (x 100) and its interval ``low``,
    ``high``."""
    records = []
    for scores in shared.values():
        identity = {key: scores.metrics[key] for key in IDENTITY_KEYS}
        for turn in sorted(scores.by_turn):
            strata = scores.by_turn[turn]
            interval = mean_interval({s: in_id_order(strata[s]) for s in sorted(strata)})
            records.append(
                {**identity, "metric": scores.metric, "turn": turn, "n": interval.n}
                | {"score": interval.mean, "low": interval.low, "high": interval.high}
            )
    return with_identity_types(
        pd.DataFrame.from_records(records, columns=[*IDENTITY_KEYS, *TURN_COLUMNS])
    )


def capkv_reference(scores: TurnScores, shared: dict[Path, TurnScores]) -> Path | None:
    """The CapKV run a shared-context run is compared with on its later turns: same model,
    task, protocol and budget, of the run's own variant where one ran, else plain CapKV; None
    for plain CapKV itself or where no CapKV ran."""
    m = scores.metrics
    by_identity = {
        (o.metrics["model"], o.metrics["task"], o.metrics["protocol"], o.metrics["budget"])
        + (o.metrics["method"], o.metrics["variant"]): path
        for path, o in shared.items()
    }
    key = (m["model"], m["task"], m["protocol"], m["budget"], CAPKV)
    if m["method"] == CAPKV:
        return by_identity.get((*key, "")) if m["variant"] else None
    return by_identity.get((*key, m["variant"]), by_identity.get((*key, "")))


def paired_record(
    scores: TurnScores,
    comparison: str,
    reference: str,
    a: dict[str, dict[str, float]],
    b: dict[str, dict[str, float]],
) -> dict[str, Any] | None:
    """One row of ``turns_paired``: A minus B paired
    (:func:`capkv.results.comparisons.paired_fields`); None where they share no example."""
    fields = paired_fields(a, b)
    if fields is None:
        return None
    return {key: scores.metrics[key] for key in IDENTITY_KEYS} | {
        "comparison": comparison,
        "reference": reference,
        "metric": scores.metric,
        **fields,
    }


def paired_turn_table(shared: dict[Path, TurnScores]) -> pd.DataFrame:
    """Per shared-context run: turn 1 against its later turns (paired over contexts, ``n``
    counts them), then against CapKV on the later turns (:func:`capkv_reference`; paired over
    questions, ``n`` counts them)."""
    records = []
    for scores in shared.values():
        records.append(paired_record(scores, TURN_VS_LATER, LATER, *scores.first_and_rest()))
        reference = capkv_reference(scores, shared)
        if reference is not None:
            theirs = shared[reference]
            label = method_label(theirs.metrics["method"], theirs.metrics["variant"])
            records.append(
                paired_record(scores, VS_CAPKV, label, scores.later(), theirs.later())
                if theirs.metric == scores.metric
                else None
            )
    frame = pd.DataFrame.from_records(
        [record for record in records if record is not None],
        columns=[*IDENTITY_KEYS, *PAIRED_COLUMNS],
    )
    return with_identity_types(with_paired_types(frame))


def turn_tables(runs: dict[Path, dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``turns`` and ``turns_paired`` (:func:`turn_table`, :func:`paired_turn_table`) of the
    shared-context runs among ``runs`` (from :func:`capkv.results.metrics.ranked_runs`); both
    empty where there are none."""
    shared = shared_runs(runs)
    return turn_table(shared), paired_turn_table(shared)


def turn_markdown(table: pd.DataFrame) -> str:
    """``turns`` with a row per run and a column per turn, each ``score [low, high]``."""
    if table.empty:
        return "(no shared-context runs yet)\n"
    keys = ["model", "task", "protocol", "method", "budget", "metric"]
    wide: dict[tuple, dict[str, Any]] = {}
    for row in table.itertuples(index=False):
        label = method_label(row.method, row.variant)
        cells = wide.setdefault(
            (row.model, row.task, row.protocol, label, row.budget, row.metric), {}
        )
        column = f"turn {row.turn}"
        cells |= {column: row.score, f"{column} low": row.low, f"{column} high": row.high}
        cells[f"{column} n"] = row.n
    turns = [f"turn {turn}" for turn in sorted(table["turn"].unique())]
    parts = [f"{turn}{part}" for turn in turns for part in ("", " low", " high", " n")]
    shown = pd.DataFrame([list(key) for key in wide], columns=keys)
    shown = pd.concat([shown, pd.DataFrame(list(wide.values())).reindex(columns=parts)], axis=1)
    caption = (
        "Headline score 0-100 by question index (turn 1: the first question asked of its "
        f"context): mean [{STATISTICS}]; n: questions asked at that turn.\n\n"
    )
    return caption + interval_markdown(shown, turns)


def paired_turn_markdown(paired: pd.DataFrame) -> str:
    """``turns_paired`` in Markdown: each difference with its interval, p and won/lost/tied."""
    if paired.empty:
        return "(no pairs yet)\n"
    labels = zip(paired["method"], paired["variant"], strict=True)
    table = pd.DataFrame(
        {
            "model": paired["model"],
            "task": paired["task"],
            "protocol": paired["protocol"],
            "budget": paired["budget"],
            "method": [method_label(method, variant) for method, variant in labels],
            "comparison": paired["comparison"],
            "against": paired["reference"],
            "n": paired["n"],
            **paired_columns(paired),
        }
    )
    caption = (
        f"Paired differences of the headline score (0-100). {TURN_VS_LATER}: turn 1 minus the "
        f"mean of the later turns, per context (n: contexts); {VS_CAPKV}: the method minus "
        "CapKV on the same questions of turn 2 on (n: questions). "
        f"{STATISTICS.replace('resamples', 'paired resamples')}; p: two-sided sign-flip "
        f"permutation test ({RESAMPLES} flips); better or worse: the interval excludes 0 and "
        f"p < {ALPHA:g}; otherwise a tie.\n\n"
    )
    return caption + markdown(table)
