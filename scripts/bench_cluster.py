"""What sharding and the launchers cost: 1 against 2 local workers, SLURM against the basic launcher.

Runs ``run.py`` as a user would, in a temporary folder, on the tiny random model and the needle
task in sweep mode (``--lengths`` x ``--depths`` prompts, 5 methods x ``--budgets``):

- **workers**: the sweep as one job (``shards=1``) and as two jobs at once (``shards=2
  shard=0,1``) through the local launcher (``hydra/launcher=local``), each job with
  ``cores / jobs`` torch threads; wall time of each multirun, and whether the tables are equal;
- **launch overhead**: ``--jobs`` jobs that find all their examples done (they start, plan,
  load the tiny model and stop) through the basic launcher (one after the other in the
  multirun's process), the local launcher and SLURM (``hydra/launcher=slurm``, a job array,
  polled with ``sacct``); the wall time per job is what a launcher costs beyond the work.
  Skipped with a note when SLURM does not answer (``sudo .ci/slurm.sh start``).

    .venv/bin/python scripts/bench_cluster.py [--lengths 1000 2000] [--jobs 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = "[capkv,snapkv,pyramidkv,h2o,streamingllm]"
TABLES = ("scores.csv", "main_table.csv", "needle.csv")


def run(cwd: Path, *overrides: str) -> float:
    """Wall time of ``python run.py <overrides>`` in ``cwd``; fails loudly if the run fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"run.py {' '.join(overrides)} failed:\n{result.stderr[-3000:]}")
    return seconds


def tables(results: Path) -> dict[str, str]:
    return {name: (results / name).read_text() for name in TABLES}


def slurm_answers() -> bool:
    if shutil.which("sbatch") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--depths", type=int, nargs="+", default=[0, 25, 50, 75, 100])
    parser.add_argument("--budgets", default="[64,256]")
    parser.add_argument("--jobs", type=int, default=4, help="jobs of the launch-overhead runs")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    sweep = [
        "model=tiny-random",
        f"task.context_lengths=[{','.join(map(str, args.lengths))}]",
        f"task.depths=[{','.join(map(str, args.depths))}]",
        f"methods={METHODS}",
        f"budgets={args.budgets}",
    ]
    n_prompts = len(args.lengths) * len(args.depths)
    print(
        f"tiny-random, needle, {n_prompts} prompts of {args.lengths} tokens x 5 methods x "
        f"{args.budgets} budgets, sweep mode, {cores} cores\n"
    )

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        rows = []
        results = {}
        for workers in (1, 2):
            results[workers] = work / f"workers{workers}"
            seconds = run(
                work,
                "-m",
                "hydra/launcher=local",
                f"hydra.launcher.cpus_per_task={max(cores // workers, 1)}",
                *sweep,
                f"shards={workers}",
                f"shard={','.join(str(i) for i in range(workers))}",
                f"results_dir={results[workers]}",
            )
            rows.append((workers, seconds))
        same = tables(results[1]) == tables(results[2])
        print("| local workers | wall time (s) | x 1 worker |\n|---:|---:|---:|")
        for workers, seconds in rows:
            print(f"| {workers} | {seconds:.1f} | {rows[0][1] / seconds:.2f} |")
        print(f"\nTables of 1 and 2 workers identical: {same}\n")

        # Launch overhead: jobs that find their examples done do no model work.
        shards = [f"shards={args.jobs}", f"shard=range(0,{args.jobs})"]
        done = work / "workers1"  # every example of the sweep is done there
        launchers = {
            "basic": [],
            "local": ["hydra/launcher=local", "hydra.launcher.cpus_per_task=1"],
        }
        slurm = slurm_answers()
        if slurm:
            launchers["slurm"] = [
                "hydra/launcher=slurm",
                "hydra.launcher.gpus_per_node=null",
                "hydra.launcher.cpus_per_task=1",
                "hydra.launcher.mem_gb=2",
            ]
        print(
            f"| launcher | {args.jobs} jobs with nothing to do: wall time (s) | per job (s) |\n"
            "|---|---:|---:|"
        )
        for name, overrides in launchers.items():
            seconds = run(work, "-m", *overrides, *sweep, *shards, f"results_dir={done}")
            print(f"| {name} | {seconds:.1f} | {seconds / args.jobs:.1f} |")
        if not slurm:
            print("\n(SLURM does not answer here: start it with sudo .ci/slurm.sh start)")


if __name__ == "__main__":
    main()
