"""Hydra's submitit launchers, with jobs that die outright reported instead of raised.

A job that raises is caught in its own process (``capkv.harness.callbacks.MultirunReport``),
but a job killed outright (SIGKILL from the out-of-memory killer, a node that disappears, a
process that never started) leaves no result, and submitit's ``job.results()`` raises in the
process that started the multirun: with the plain launchers, that stops the multirun with
submitit's traceback before the other jobs' results are read or the tables rebuilt. These
launchers read each job's result on its own (:func:`install`, called by the multirun's callback
before the jobs are submitted, gives hydra-submitit-launcher's launchers this ``launch``; Hydra
takes launcher plugins only from its ``hydra_plugins`` package, so a subclass of our own could
not be chosen):
a lost job is printed in one line, recorded as failed in its output folder's ``job.json``, and the
multirun goes on, ending with the summary and exit status 1. Its finished rows stay on disk, so
submitting the same command again resumes it.

Needs ``hydra-submitit-launcher`` (the ``cluster`` extra); this module is imported only when one
of its launchers runs a multirun.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf, open_dict

from capkv.harness.errors import one_sentence
from capkv.harness.jobs import JOB_FILE, JobFailed, results_folder
from capkv.storage.files import write_atomically

log = logging.getLogger(__name__)


def lost_job_message(state: str) -> str:
    """The one line of a job that ended without a result, ``state`` as the scheduler reports it."""
    return (
        f"error: the job ended without a result (state {state}): killed outright (SIGKILL, as "
        "the out-of-memory killer does) or its node was lost; the rows it finished are kept: "
        "submit the same command again to resume."
    )


def install() -> None:
    """Give submitit's launchers (local and SLURM) :func:`reporting_launch` (idempotent)."""
    BaseSubmititLauncher.launch = reporting_launch


def reporting_launch(
    launcher: BaseSubmititLauncher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> Sequence[JobReturn]:
    """Submit every job, then collect each job's result on its own (hydra-submitit-launcher
    1.2's ``launch``, but for the last step)."""
    import submitit

    if launcher.config is None or not job_overrides:
        raise ValueError("the launcher was not set up, or was given no jobs")
    init_params = {"folder": launcher.params["submitit_folder"]}
    specific_init_keys = {"max_num_timeout"}
    init_params.update(
        **{
            f"{launcher._EXECUTOR}_{x}": y
            for x, y in launcher.params.items()
            if x in specific_init_keys
        }
    )
    init_keys = specific_init_keys | {"submitit_folder"}
    executor = submitit.AutoExecutor(cluster=launcher._EXECUTOR, **init_params)
    baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{
            x if x in baseparams else f"{launcher._EXECUTOR}_{x}": y
            for x, y in launcher.params.items()
            if x not in init_keys
        }
    )
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in launcher.config.hydra.sweep:
        os.chmod(sweep_dir, mode=int(str(launcher.config.hydra.sweep.mode), 8))
    job_params: list[Any] = []
    for offset, overrides in enumerate(job_overrides):
        index = initial_job_idx + offset
        log.info(f"\t#{index} : {' '.join(filter_overrides(overrides))}")
        job_params.append(
            (
                list(overrides),
                "hydra.sweep.dir",
                index,
                f"job_id_for_{index}",
                Singleton.get_state(),
            )
        )
    jobs = executor.map_array(launcher, *zip(*job_params, strict=True))
    returns = []
    for offset, (overrides, job) in enumerate(zip(job_overrides, jobs, strict=True)):
        try:
            returns.append(job.results()[0])
        except Exception:  # submitit's UncompletedJobError, FailedJobError: no result
            returns.append(lost(launcher, initial_job_idx + offset, list(overrides), job.state))
    return returns


def lost(launcher: BaseSubmititLauncher, index: int, overrides: list[str], state: str) -> JobReturn:
    """Report job ``index`` that left no result, record it as failed, and hand it back to
    Hydra as finished (so the multirun goes on)."""
    message = lost_job_message(one_sentence(state))
    print(f"job #{index}: {message}", file=sys.stderr, flush=True)
    record = {"num": index, "overrides": overrides, "results_dir": None, "error": message}
    folder = Path(str(launcher.config.hydra.sweep.dir)) / f"lost-{index}"
    try:
        job_config = launcher.hydra_context.config_loader.load_sweep_config(
            launcher.config, overrides
        )
        with open_dict(job_config.hydra.job):
            job_config.hydra.job.num = index
        folder = Path(str(job_config.hydra.sweep.dir)) / str(job_config.hydra.sweep.subdir)
        record["results_dir"] = str(results_folder(job_config))
    except Exception:  # a subdir naming what only a running job knows: the fallback folder
        pass
    write_atomically(folder / JOB_FILE, json.dumps(record) + "\n")
    job_return = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
    job_return.return_value = JobFailed(message)
    return job_return
