"""Perplexity of texts read under a bounded cache: the fields a reading writes into each row,
pooled into perplexities for ``metrics.json``, and the perplexity table.

A row of :class:`capkv.tasks.perplexity.PerplexityTask` holds the negative log-likelihood (NLL,
nats) of every scored token of one text, summed overall and per position bucket, with the
counts. Perplexity is ``exp`` of the mean NLL per token: lower is better and it has no upper
bound, so it stays out of the tables built for scores in [0, 1] (the main table, its average,
``intervals.csv`` and the paired comparisons, :func:`capkv.results.metrics.ranked_runs`) and gets its
own, ``perplexity.csv|md`` (:func:`perplexity_table`), beside a figure of perplexity against
position (:mod:`capkv.figures.perplexity`):

- per run and position bucket (``all``: the whole text), the perplexity pooled over the texts
  with its 95% interval: the percentile bootstrap interval of the mean NLL over the texts
  (:mod:`capkv.results.uncertainty`), through ``exp`` (the texts have equal lengths, so the mean of their
  mean NLLs is the pooled one);
- its ratio to the full cache's perplexity on the same texts, ``exp`` of the paired mean NLL
  difference, with its paired interval and sign-flip p-value (above 1: worse than the full
  cache);
- the most tokens any KV head held at once (``peak_tokens_per_layer`` of the rows).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from capkv.results.format import markdown, with_identity_types
from capkv.results.metrics import is_perplexity
from capkv.results.order import budget_order
from capkv.results.store import IDENTITY_KEYS, finished_rows, method_label
from capkv.results.uncertainty import CONFIDENCE, RESAMPLES, SEED, compare, mean_interval
from capkv.tasks.perplexity import bucket_label

WHOLE = "all"  # the position bucket of the whole text
FULL = "full"

# position bucket -> example id -> mean NLL per token (nats)
TextNll = dict[str, dict[str, float]]


def text_nll(rows: list[dict[str, Any]]) -> TextNll:
    """Each text's mean NLL per token, overall (:data:`WHOLE`) and per position bucket."""
    by_bucket: TextNll = {WHOLE: {}}
    for row in rows:
        by_bucket[WHOLE][row["example_id"]] = row["nll_sum"] / row["scored_tokens"]
        buckets = zip(
            row["bucket_starts"],
            row["bucket_ends"],
            row["bucket_nll_sums"],
            row["bucket_tokens"],
            strict=True,
        )
        for start, end, nll_sum, tokens in buckets:
            if tokens:
                by_bucket.setdefault(bucket_label(start, end), {})[row["example_id"]] = (
                    nll_sum / tokens
                )
    return by_bucket


def peak_tokens(rows: list[dict[str, Any]]) -> float:
    """The most tokens any KV head held at once over a run's texts (NaN when not recorded)."""
    peaks = [max(row["peak_tokens_per_layer"]) for row in rows if row.get("peak_tokens_per_layer")]
    return float(max(peaks)) if peaks else math.nan


def full_reference(metrics: dict[str, Any], runs: dict[Path, dict[str, Any]]) -> Path | None:
    """The full-cache run a run is compared with: same model and task, preferably the same
    variant (chunk) and protocol; None when there is none."""
    candidates = [
        (m["variant"] != metrics["variant"], m["protocol"] != metrics["protocol"], str(path))
        for path, m in runs.items()
        if m["method"] == FULL and m["model"] == metrics["model"] and m["task"] == metrics["task"]
    ]
    return Path(min(candidates)[2]) if candidates else None


def buckets(rows: list[dict[str, Any]]) -> list[tuple[str, int, int, int]]:
    """(label, first position, end position, scored tokens of all texts) of the whole text
    (:data:`WHOLE`), then of each position bucket."""
    first = rows[0]
    spans = [(WHOLE, 0, first["bucket_ends"][-1], sum(row["scored_tokens"] for row in rows))]
    for k, (start, end) in enumerate(
        zip(first["bucket_starts"], first["bucket_ends"], strict=True)
    ):
        tokens = sum(row["bucket_tokens"][k] for row in rows)
        spans.append((bucket_label(start, end), start, end, tokens))
    return spans


COMPARISON = ["full_perplexity", "ratio_to_full", "ratio_low", "ratio_high", "p_value"]


def against_full(ours: dict[str, float], full: dict[str, float]) -> dict[str, float]:
    """The full cache's perplexity on the texts both read, and the ratio of ours to it: ``exp``
    of the paired mean NLL difference, its interval and p-value (NaN without a shared text)."""
    shared = sorted(set(ours) & set(full))
    if not shared:
        return dict.fromkeys(COMPARISON, math.nan)
    result = compare({"": {i: ours[i] for i in shared}}, {"": {i: full[i] for i in shared}})
    difference = result.difference
    return {
        "full_perplexity": math.exp(float(np.mean([full[i] for i in shared]))),
        "ratio_to_full": math.exp(difference.mean),
        "ratio_low": math.exp(difference.low),
        "ratio_high": math.exp(difference.high),
        "p_value": result.p_value,
    }


TABLE_COLUMNS = [*IDENTITY_KEYS, "positions", "start", "end", "texts", "tokens", "peak_tokens"]
TABLE_COLUMNS += ["capacity_fraction", "nll", "perplexity", "low", "high", *COMPARISON]


def run_order(metrics: dict[str, Any]) -> tuple:
    """The full cache first, then budgets from the tightest, then methods by label."""
    return (*budget_order(metrics), method_label(metrics["method"], metrics["variant"]))


def perplexity_table(runs: dict[Path, dict[str, Any]]) -> pd.DataFrame:
    """One row per perplexity run and position bucket (the whole text first), from the run
    folders (``runs``: :func:`capkv.results.metrics.load_metrics`): texts, scored tokens, the peak,
    mean NLL, perplexity with its interval, and the ratio to the full cache's."""
    reading = {path: m for path, m in runs.items() if is_perplexity(m)}
    rows = {path: finished_rows(path.parent) for path in reading}
    nll = {path: text_nll(rows[path]) for path in reading if rows[path]}
    records = []
    for path, metrics in sorted(reading.items(), key=lambda item: run_order(item[1])):
        if path not in nll:
            continue
        reference = full_reference(metrics, {p: m for p, m in reading.items() if p in nll})
        identity = {key: metrics[key] for key in IDENTITY_KEYS}
        for label, start, end, tokens in buckets(rows[path]):
            by_text = nll[path].get(label, {})
            if not by_text:
                continue
            interval = mean_interval({"": [by_text[i] for i in sorted(by_text)]})
            full = nll[reference].get(label, {}) if reference is not None else {}
            records.append(
                {
                    **identity,
                    "positions": label,
                    "start": start,
                    "end": end,
                    "texts": interval.n,
                    "tokens": tokens,
                    "peak_tokens": peak_tokens(rows[path]),
                    "capacity_fraction": metrics.get("diagnostics", {}).get(
                        "capacity_fraction", math.nan
                    ),
                    "nll": interval.mean,
                    "perplexity": math.exp(interval.mean),
                    "low": math.exp(interval.low),
                    "high": math.exp(interval.high),
                    **against_full(by_text, full),
                }
            )
    return with_identity_types(pd.DataFrame.from_records(records, columns=TABLE_COLUMNS))


def perplexity_markdown(table: pd.DataFrame) -> str:
    """The perplexity table in Markdown: one line per run, the whole text's perplexity with its
    interval, its ratio to the full cache's, then the perplexity of each position bucket."""
    if table.empty:
        return "(no perplexity runs yet)\n"
    whole = table[table["positions"] == WHOLE].reset_index(drop=True)
    parts = table[table["positions"] != WHOLE]
    run = ["model", "task", "method", "variant", "budget", "protocol"]
    by_bucket = parts.pivot_table(index=run, columns="positions", values="perplexity", sort=False)
    labels = list(dict.fromkeys(parts.sort_values("start")["positions"]))
    shown = pd.DataFrame(
        {
            "model": whole["model"],
            "task": whole["task"],
            "protocol": whole["protocol"],
            "method": [
                method_label(m, v) for m, v in zip(whole["method"], whole["variant"], strict=True)
            ],
            "budget": whole["budget"],
            "texts": whole["texts"],
            "peak tokens": whole["peak_tokens"].map(lambda v: "" if pd.isna(v) else f"{v:.0f}"),
            "capacity kept": whole["capacity_fraction"].map(
                lambda v: "" if pd.isna(v) else f"{v:.3f}"
            ),
            "perplexity [95% CI]": [
                bounded(*values)
                for values in zip(whole["perplexity"], whole["low"], whole["high"], strict=True)
            ],
            "x full cache [95% CI]": [
                bounded(*values, digits=3)
                for values in zip(
                    whole["ratio_to_full"], whole["ratio_low"], whole["ratio_high"], strict=True
                )
            ],
            "p": whole["p_value"].map(lambda v: "" if pd.isna(v) else f"{v:.3f}"),
        }
    )
    keys = list(zip(*(whole[column] for column in run), strict=True))
    for label in labels:
        column = by_bucket[label] if label in by_bucket else pd.Series(dtype=float)
        shown[label] = [column.get(key, math.nan) for key in keys]
    caption = (
        "Perplexity (exp of the mean NLL per token; lower is better) over each text read under "
        f"the bound, pooled over the texts: mean [{100 * CONFIDENCE:g}% interval], a percentile "
        f"bootstrap over the texts ({RESAMPLES} resamples, seed {SEED}); x full cache: the ratio "
        "to the full cache's perplexity on the same texts with its paired interval, p: sign-flip "
        "test of no difference; peak tokens: the most any KV head held at once; capacity kept: "
        "the log-det capacity fraction each compression kept of the cache it compressed, CapKV's "
        "objective (mean over compressions, layers and texts); then the perplexity of each range "
        "of token positions.\n\n"
    )
    return caption + markdown(shown, digits=dict.fromkeys(labels, 2))


def bounded(value: float, low: float, high: float, digits: int = 2) -> str:
    """``12.34 [11.90, 12.80]``; blank where the value is missing."""
    if pd.isna(value):
        return ""
    if pd.isna(low):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
