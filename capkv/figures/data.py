"""The tables figures are drawn from: read from a results folder, never written here.

``make tables`` (:func:`capkv.results.tables.aggregate`) builds ``scores.csv``, ``needle.csv``,
``intervals.csv`` (every headline with its bootstrap interval), ``perplexity.csv``,
``long_generation.csv``, ``turns.csv`` and ``frontier.csv`` from the run folders; drawing only
reads them, after checking that they are what the run folders give now (a table older than a
run's ``metrics.json`` stops the drawing with what to run).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from capkv.figures.style import is_full
from capkv.results import frontier, length_buckets, long_generation, turns
from capkv.results.metrics import is_long_generation, is_perplexity, load_metrics
from capkv.results.store import IDENTITY_KEYS, RUN_KEYS, RUNS
from capkv.results.tables import score_table
from capkv.tasks.longbench.task import BENCHMARK_E

SCORES = "scores.csv"
NEEDLE = "needle.csv"
INTERVALS = "intervals.csv"
TABLES = (SCORES, NEEDLE, INTERVALS)
PERPLEXITY = "perplexity.csv"  # folders with perplexity runs (capkv.results.perplexity) only
LONGBENCH_E = f"{length_buckets.TABLE}.csv"  # folders with LongBench-E runs only
TURNS = f"{turns.TABLE}.csv"  # folders with shared-context runs (capkv.results.turns) only
FRONTIER = f"{frontier.TABLE}.csv"  # folders with byte-measured runs (capkv.results.frontier) only
LONG_GENERATION = f"{long_generation.TABLE}.csv"  # folders with long-generation runs only
NEEDLE_COLUMNS = [*IDENTITY_KEYS, "context_length", "depth", "prompt_tokens"]


def rebuild_command(results_dir: Path) -> str:
    return f"`make tables` (or `python -m capkv.results {results_dir}`)"


def check_fresh(results_dir: Path) -> None:
    """Refuse tables that are missing or older than the run folders' ``metrics.json``.

    "Older" is judged by content, not by file times (a fresh clone gives every file the same
    time): ``scores.csv`` must be exactly what the ``metrics.json`` files give now. A results
    folder without ``runs/`` (tables copied on their own) is taken as it is.

    Raises
    ------
    ValueError
        If a table is missing or stale, saying what to run.
    """
    if not (results_dir / RUNS).is_dir():
        return
    runs = load_metrics(results_dir)
    missing = [name for name in TABLES if not (results_dir / name).exists()]
    if missing and not runs:
        return  # nothing has run yet: nothing to draw
    if missing:
        raise ValueError(
            f"{results_dir / missing[0]} is missing; build the tables from the run folders with "
            f"{rebuild_command(results_dir)}, then draw."
        )
    optional = {
        PERPLEXITY: is_perplexity,
        LONGBENCH_E: lambda m: m.get("benchmark") == BENCHMARK_E,
        LONG_GENERATION: is_long_generation,
    }
    for name, holds in optional.items():
        if any(holds(m) for m in runs.values()) and not (results_dir / name).exists():
            raise ValueError(
                f"{results_dir / name} is missing; build the tables from the run folders with "
                f"{rebuild_command(results_dir)}, then draw."
            )
    if (results_dir / SCORES).read_text(encoding="utf-8") != score_table(runs).to_csv(index=False):
        raise ValueError(
            f"{results_dir / SCORES} is older than the run folders under {results_dir / RUNS}; "
            f"rebuild the tables with {rebuild_command(results_dir)}, then draw."
        )


def read_csv(path: Path) -> pd.DataFrame:
    """The table at ``path``; empty when the file is missing or holds no rows.

    Identity columns come back typed: names as strings (an empty variant as ``""``), budget
    tokens and ratio as floats (NaN where a run has none).

    Raises
    ------
    ValueError
        If the file is not a table of runs (damaged, or not written by the harness).
    """
    try:
        frame = pd.read_csv(path)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        problem = f"is not a CSV table ({str(error).splitlines()[0]})"
    else:
        missing = [key for key in IDENTITY_KEYS if key not in frame.columns]
        if not missing:
            frame["variant"] = frame["variant"].fillna("")
            frame[RUN_KEYS] = frame[RUN_KEYS].astype(str)
            frame[["budget_tokens", "ratio"]] = frame[["budget_tokens", "ratio"]].astype(float)
            return frame
        problem = f"lacks the columns {', '.join(missing)}"
    raise ValueError(
        f"{path} {problem}; delete it and rebuild the tables from the run folders under runs/ "
        f"with {rebuild_command(path.parent)}."
    )


def load_tables(results_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``scores.csv``, ``needle.csv`` and ``intervals.csv`` of ``results_dir``, checked fresh
    first."""
    check_fresh(results_dir)
    return tuple(read_csv(results_dir / name) for name in TABLES)


def load_length_buckets(results_dir: Path) -> pd.DataFrame:
    """``longbench_e.csv`` of ``results_dir`` (empty where no run is of LongBench-E); call after
    :func:`load_tables`, which checks that it is there when it should be."""
    return read_csv(results_dir / LONGBENCH_E)


def load_turns(results_dir: Path) -> pd.DataFrame:
    """``turns.csv`` of ``results_dir``: scores by question index of the shared-context runs
    (empty where there are none)."""
    return read_csv(results_dir / TURNS)


def load_frontier(results_dir: Path) -> pd.DataFrame:
    """``frontier.csv`` of ``results_dir``: score against KV bytes of the byte-measured runs
    (empty where there are none)."""
    return read_csv(results_dir / FRONTIER)


def load_perplexity(results_dir: Path) -> pd.DataFrame:
    """``perplexity.csv`` of ``results_dir`` (empty where no run reads perplexity); call after
    :func:`load_tables`, which checks that it is there when it should be."""
    return read_csv(results_dir / PERPLEXITY)


def load_long_generation(results_dir: Path) -> pd.DataFrame:
    """``long_generation.csv`` of ``results_dir`` (empty where no run is of long generation);
    call after :func:`load_tables`, which checks that it is there when it should be."""
    return read_csv(results_dir / LONG_GENERATION)


def interval_of(
    intervals: pd.DataFrame, level: str
) -> dict[tuple, tuple[float, float, float, int]]:
    """(model, task, method, variant, budget, protocol, metric, group) -> (mean, low, high, n)
    of one level (``task``, ``family`` or ``subtask``) of ``intervals.csv``."""
    rows = intervals[intervals["level"] == level] if not intervals.empty else intervals
    return {
        (*run, metric, group): (mean, low, high, n)
        for *run, metric, group, mean, low, high, n in rows[
            [*RUN_KEYS, "metric", "group", "mean", "low", "high", "n"]
        ].itertuples(index=False, name=None)
    }


def for_protocol(frame: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """Rows of one protocol. The full cache evicts nothing, so the protocol does not change it:
    when ``protocol`` has no full-cache run, one from another protocol stands in."""
    own = frame[frame["protocol"] == protocol]
    if own["method"].map(is_full).any():
        return own
    full = frame[frame["method"].map(is_full)]
    if full.empty:
        return own
    return pd.concat([own, full[full["protocol"] == min(full["protocol"])]])


def needle_scores(needle: pd.DataFrame) -> list[str]:
    """Score columns of the needle table (``exact``, ``graded``)."""
    return [c for c in needle.columns if c not in NEEDLE_COLUMNS]
