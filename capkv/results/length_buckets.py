"""LongBench-E's table (``longbench_e.csv`` and ``.md``): each LongBench-E run's score per
dataset and length bucket, and each bucket's average over the datasets, as ``eval.py --e``
reports them (the averaging itself: :mod:`capkv.tasks.longbench.buckets`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from capkv.results.format import markdown, with_identity_types
from capkv.results.metrics import run_reporting
from capkv.results.order import run_order
from capkv.results.store import IDENTITY_KEYS, RUN_KEYS, finished_rows
from capkv.tasks.longbench.buckets import AVERAGE, BUCKETS, bucket_scores
from capkv.tasks.longbench.task import BENCHMARK_E

TABLE = "longbench_e"  # longbench_e.csv, longbench_e.md: folders with LongBench-E runs only
COLUMNS = ["subtask", "bucket", "score", "n"]


def length_bucket_table(runs: dict[Path, dict[str, Any]]) -> pd.DataFrame:
    """One row per LongBench-E run, dataset (then ``average``) and length bucket.

    Parameters
    ----------
    runs : dict[Path, dict]
        ``metrics.json`` path -> its content, for every run of a results folder
        (:func:`capkv.results.metrics.load_metrics`).

    Returns
    -------
    pandas.DataFrame
        The run's identity columns, ``subtask``, ``bucket``, ``score`` (0-100) and ``n`` (the
        examples behind it); empty when no run is of LongBench-E.
    """
    records = []
    for metrics_path, metrics in sorted(runs.items(), key=lambda item: run_order(item[1])):
        reporting = run_reporting(metrics_path, metrics)
        if reporting is None or reporting.benchmark != BENCHMARK_E:
            continue
        identity = {key: metrics[key] for key in IDENTITY_KEYS}
        for score in bucket_scores(finished_rows(metrics_path.parent), reporting.headline):
            records.append({**identity, **vars(score)})
    frame = pd.DataFrame.from_records(records, columns=[*IDENTITY_KEYS, *COLUMNS])
    return with_identity_types(frame)


def length_bucket_markdown(table: pd.DataFrame) -> str:
    """The table with a column per bucket (``score (n=...)``), a row per run and dataset."""
    if table.empty:
        return "(no LongBench-E runs yet)\n"
    keys = [*RUN_KEYS, "subtask"]
    cells = [f"{score:.1f} (n={n})" for score, n in zip(table["score"], table["n"], strict=True)]
    wide = table.assign(cell=cells).pivot_table(
        index=keys, columns="bucket", values="cell", aggfunc="first", sort=False
    )
    wide = wide.reindex(columns=[b for b in BUCKETS if b in wide.columns]).reset_index()
    wide.columns.name = None
    caption = (
        "LongBench-E: score 0-100 in each length bucket (the record's length in words, as "
        f"eval.py --e sorts them); n: examples; {AVERAGE}: the mean of the datasets' scores in "
        "the bucket.\n\n"
    )
    return caption + markdown(wide.fillna(""))
