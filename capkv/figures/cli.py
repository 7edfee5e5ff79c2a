"""``python -m capkv.figures [--results results] [--plots plots]``: draw every figure and
per-task table the tables of a results folder allow, each figure as PNG and PDF."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from capkv.figures.allocation import draw_allocations
from capkv.figures.canvas import Job, render_all
from capkv.figures.capacity import capacity_jobs
from capkv.figures.curves import curve_jobs
from capkv.figures.data import (
    interval_of,
    load_frontier,
    load_length_buckets,
    load_long_generation,
    load_perplexity,
    load_tables,
    load_turns,
)
from capkv.figures.frontier import frontier_jobs
from capkv.figures.heatmaps import heatmap_grid_jobs, heatmap_jobs
from capkv.figures.length_buckets import length_jobs
from capkv.figures.long_generation import long_generation_jobs
from capkv.figures.perplexity import perplexity_jobs
from capkv.figures.tables import task_tables
from capkv.figures.turns import turn_jobs
from capkv.harness.errors import one_line_errors

HOW_TO_RUN = (
    "produce results with `python run.py method=full` (the full-cache reference) and "
    "`python run.py -m method=capkv,snapkv budget=128,512` (they go to outputs/results), then "
    "`make tables figures RESULTS=outputs/results PLOTS=outputs/plots`."
)


def draw_all(results_dir: str | Path, plots_dir: str | Path) -> list[Path]:
    """Every figure and table that the tables of ``results_dir`` allow; returns the paths
    written."""
    results_dir, plots_dir = Path(results_dir), Path(plots_dir)
    scores, needle, intervals = load_tables(results_dir)
    jobs: list[Job] = []
    if not needle.empty:
        bounds = interval_of(intervals, "task")
        jobs += [*heatmap_grid_jobs(needle, bounds, plots_dir)]
        jobs += [*heatmap_jobs(needle, bounds, plots_dir)]
    if not scores.empty:
        jobs += [*curve_jobs(intervals, plots_dir), *capacity_jobs(scores, intervals, plots_dir)]
    jobs += [*perplexity_jobs(load_perplexity(results_dir), plots_dir)]
    jobs += [*length_jobs(load_length_buckets(results_dir), plots_dir)]
    jobs += [*turn_jobs(load_turns(results_dir), plots_dir)]
    jobs += [*frontier_jobs(load_frontier(results_dir), plots_dir)]
    jobs += [*long_generation_jobs(load_long_generation(results_dir), plots_dir)]
    written = render_all(jobs) + draw_allocations(results_dir, plots_dir)
    return written + (task_tables(intervals, plots_dir) if not scores.empty else [])


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m capkv.figures [--results results] [--plots plots]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="results folder (default: results)")
    parser.add_argument("--plots", default="plots", help="output folder (default: plots)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    with one_line_errors():
        written = draw_all(args.results, args.plots)
    if not written:
        print(f"Nothing to draw: no results under {args.results}/; {HOW_TO_RUN}")
        return
    print(f"Wrote {len(written)} files under {args.plots}/:")
    for path in written:
        print(f"  {path}")
