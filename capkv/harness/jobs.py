"""What a job of a multirun leaves for the process that started it: a ``job.json`` in its output
folder (written by the job's callback, or by the launcher for a job that died without a result)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

JOB_FILE = "job.json"


@dataclass
class JobFailed:
    """What a failed job returns to Hydra instead of raising (so the multirun goes on)."""

    message: str


def results_folder(config: DictConfig) -> Path:
    """The results folder a job's config names, absolute (from Hydra's working directory)."""
    results = Path(str(config.results_dir))
    return results if results.is_absolute() else Path(config.hydra.runtime.cwd) / results
