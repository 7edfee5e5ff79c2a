"""LongBench-E's scores per length bucket, as ``eval.py``'s ``scorer_e`` reports them.

``scorer_e`` sorts a dataset's examples by their ``length`` field into 0-4k, 4-8k and 8k+ and
reports the mean score of each bucket x 100. Over the datasets, a bucket's average is the mean of
the datasets' bucket scores (each dataset counts once, as LongBench averages datasets). The
examples carry their bucket (``metadata["length_bucket"]``, set by
:class:`~capkv.tasks.longbench.LongBench` with ``variant="e"``); this module only averages rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from capkv.tasks.longbench.settings import E_DATASETS, LENGTH_BUCKETS

BUCKETS: tuple[str, ...] = tuple(name for name, _ in LENGTH_BUCKETS)
AVERAGE = "average"


@dataclass(frozen=True)
class BucketScore:
    """One dataset's (or the average's) score in one length bucket.

    Attributes
    ----------
    subtask : str
        The dataset, or ``"average"`` (the mean over the datasets with examples in the bucket).
    bucket : str
        ``"0-4k"``, ``"4-8k"`` or ``"8k+"``.
    score : float
        Mean score x 100.
    n : int
        Examples behind it.
    """

    subtask: str
    bucket: str
    score: float
    n: int


def _order(subtask: str) -> tuple[int, str]:
    return (E_DATASETS.index(subtask) if subtask in E_DATASETS else len(E_DATASETS)), subtask


def bucket_scores(rows: Iterable[dict[str, Any]], headline: str = "score") -> list[BucketScore]:
    """Per-bucket scores of one run's example rows (``examples.jsonl``).

    Parameters
    ----------
    rows : Iterable[dict]
        Rows with ``subtask``, ``scores[headline]`` and ``metadata["length_bucket"]``.
    headline : str
        The score to average.

    Returns
    -------
    list[BucketScore]
        Every (dataset, bucket) with examples, datasets in LongBench-E's order and buckets by
        length, then the average of each bucket over the datasets; empty when no row has a bucket.
    """
    groups: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        bucket = (row.get("metadata") or {}).get("length_bucket")
        if bucket is None:
            continue
        groups.setdefault((row["subtask"], bucket), []).append(float(row["scores"][headline]))
    keys = sorted(groups, key=lambda key: (_order(key[0]), BUCKETS.index(key[1])))
    scores = [
        BucketScore(
            subtask,
            bucket,
            100 * sum(groups[subtask, bucket]) / len(groups[subtask, bucket]),
            len(groups[subtask, bucket]),
        )
        for subtask, bucket in keys
    ]
    for bucket in BUCKETS:
        inside = [score for score in scores if score.bucket == bucket]
        if inside:
            mean = sum(score.score for score in inside) / len(inside)
            scores.append(BucketScore(AVERAGE, bucket, mean, sum(s.n for s in inside)))
    return scores
