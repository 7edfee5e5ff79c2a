"""The multirun's Hydra callback: each failed job reported in one line, the tables rebuilt once.

Configured under ``hydra.callbacks`` in ``conf/config.yaml``. Jobs of a multirun run in this
process (basic launcher), in local processes or on SLURM nodes (submitit), so what a job leaves
for the end of the multirun is a small file in its own output folder (``job.json``: its
overrides, its results folder and its error, if any), which the shared filesystem carries back:

- ``on_job_end`` (in the job's process): a job that raised prints ``error: <message>`` once and
  is recorded as failed; it is handed back to Hydra as finished, so the multirun goes on with
  the other jobs instead of stopping at the first failure;
- ``on_multirun_end`` (in the process that started the multirun): the tables of every results
  folder the jobs wrote are rebuilt once (:func:`capkv.results.tables.aggregate`), then a summary names
  the jobs that failed, and the multirun exits with status 1 if any did.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from capkv.harness.cluster import JobStopped
from capkv.harness.errors import explain, one_sentence
from capkv.harness.jobs import JOB_FILE, JobFailed, results_folder
from capkv.results.tables import aggregate
from capkv.storage.files import write_atomically

TRACEBACK_FILE = "traceback.txt"


def one_line(error: BaseException) -> str:
    """A failed job's error as one line: the sentence a single run would print for bad input
    (:func:`capkv.harness.errors.explain`), else the error's type and message (its traceback is saved
    beside the job's output)."""
    message = str(error) if isinstance(error, JobStopped) else explain(error)
    if message is None:
        message = one_sentence(f"{type(error).__name__}: {error}")
    return f"error: {message}"


def job_folders(sweep_dir: Path) -> list[Path]:
    return sorted((p.parent for p in sweep_dir.glob(f"*/{JOB_FILE}")), key=lambda p: p.name)


class MultirunReport(Callback):
    """Per-job failures in one line, one aggregation and a summary at the end of a multirun."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        target = str(config.hydra.launcher.get("_target_", ""))
        if target.startswith("hydra_plugins.hydra_submitit_launcher."):
            from capkv.harness.launchers import install

            install()  # a job killed outright is reported, not raised (capkv.harness.launchers)
        for folder in job_folders(Path(str(config.hydra.sweep.dir))):
            (folder / JOB_FILE).unlink(missing_ok=True)  # left by an earlier multirun

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        output = Path(config.hydra.runtime.output_dir)
        record: dict[str, Any] = {
            "num": config.hydra.job.num,
            "overrides": list(config.hydra.overrides.task),
            "results_dir": str(results_folder(config)),
            "error": None,
        }
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value
            record["error"] = one_line(error)
            print(f"job #{record['num']}: {record['error']}", file=sys.stderr, flush=True)
            trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            write_atomically(output / TRACEBACK_FILE, trace)
            job_return.status = JobStatus.COMPLETED
            job_return.return_value = JobFailed(record["error"])
        write_atomically(output / JOB_FILE, json.dumps(record) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        records = [
            json.loads((folder / JOB_FILE).read_text())
            for folder in job_folders(Path(str(config.hydra.sweep.dir)))
        ]
        for results_dir in sorted({r["results_dir"] for r in records if r["results_dir"]}):
            if Path(results_dir, "runs").is_dir():
                aggregate(results_dir)
                print(f"tables rebuilt under {results_dir}", file=sys.stderr)
        failed = [record for record in records if record["error"]]
        if not failed:
            return
        print(
            f"multirun: {len(failed)} of {len(records)} jobs failed:",
            *(
                f"  #{r['num']} ({' '.join(r['overrides'])}): {r['error']}"
                for r in sorted(failed, key=lambda r: r["num"])
            ),
            sep="\n",
            file=sys.stderr,
        )
        sys.exit(1)
