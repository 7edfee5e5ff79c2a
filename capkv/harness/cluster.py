"""Launching on a cluster or on several local devices: launcher choices and per-job resources.

A multirun (``python run.py -m hydra/launcher=slurm ...``) hands each job to Hydra's submitit
launcher: ``conf/hydra/launcher/slurm.yaml`` submits a SLURM job array, ``local.yaml`` starts
every job at once as a process of this machine. A job then uses only what it was given:

- SLURM sets ``CUDA_VISIBLE_DEVICES`` to the GPUs it allocated; ``device=cuda`` is the first.
- submitit's local executor gives every job the same devices (``0..gpus_per_node-1``), so each
  job keeps one of them, its job number modulo their count (:func:`narrow_local_devices`).
- torch uses ``hydra.launcher.cpus_per_task`` threads when it is set (:func:`limit_threads`).
- SIGTERM (``scancel``, preemption, the time limit) ends a submitit job at once, keeping every
  row written, instead of being ignored until SLURM's SIGKILL (:func:`stop_on_sigterm`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
from pathlib import Path

from omegaconf import DictConfig

LAUNCHER_DIR = Path(__file__).resolve().parents[2] / "conf" / "hydra" / "launcher"
BUILT_IN = ("basic",)
SUBMITIT = ("submitit_local", "submitit_slurm")
SLURM = ("slurm", "submitit_slurm")
SUBMITIT_MISSING = "install it with: pip install -e '.[cluster]' (hydra-submitit-launcher)"


def launcher_options() -> list[str]:
    """Launchers ``hydra/launcher=`` accepts: this project's configs and Hydra's own."""
    return sorted({*BUILT_IN, *SUBMITIT, *(p.stem for p in LAUNCHER_DIR.glob("*.yaml"))})


def submitit_installed() -> bool:
    return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None


def check_launcher(choice: str) -> None:
    """Refuse, with one sentence, a launcher that is unknown or cannot run here."""
    if choice not in launcher_options():
        raise ValueError(
            f"unknown launcher {choice!r}; choose one of: {', '.join(launcher_options())}."
        )
    if choice not in BUILT_IN and not submitit_installed():
        raise ValueError(
            f"launcher {choice!r} needs Hydra's submitit launcher; {SUBMITIT_MISSING}."
        )
    if choice in SLURM and shutil.which("sbatch") is None:
        raise ValueError(
            f"launcher {choice!r} submits with sbatch, which is not on the PATH; run from a "
            "SLURM login node (or load its module), or use hydra/launcher=local on one machine."
        )
    if choice in SLURM:
        check_slurm_answers()


def check_slurm_answers() -> None:
    """Refuse a SLURM whose controller does not answer ``sinfo`` (a traceback from sbatch
    otherwise)."""
    try:
        answer = subprocess.run(
            ["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ValueError(f"SLURM does not answer (sinfo: {error}); check the cluster.") from None
    if answer.returncode != 0:
        lines = answer.stderr.strip().splitlines() or ["no output"]
        raise ValueError(
            f"SLURM does not answer (sinfo: {lines[-1]}); check that slurmctld is up and "
            "slurm.conf is readable here."
        )


def launcher_choice(argv: list[str]) -> str | None:
    """The ``hydra/launcher=`` choice on a command line, if any."""
    for argument in argv:
        key, _, value = argument.lstrip("+~").partition("=")
        if key == "hydra/launcher":
            return value
    return None


def narrow_local_devices(job_num: int) -> None:
    """In a job of submitit's local executor that sees several GPUs, keep one of them."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "local":
        return
    devices = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if len(devices) > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[job_num % len(devices)]


def limit_threads(launcher: DictConfig | None) -> None:
    """Use the CPU threads a launcher gave the job (``cpus_per_task``), if it says."""
    cpus = launcher.get("cpus_per_task") if launcher is not None else None
    if cpus:
        import torch

        torch.set_num_threads(int(cpus))


class JobStopped(RuntimeError):
    """The job was sent SIGTERM."""


def stop_on_sigterm() -> None:
    """In a submitit job, make SIGTERM end the job with one line (submitit ignores it, so a
    cancelled job would run on until SLURM kills it)."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return  # the basic launcher: the multirun's own process handles its signals

    def stop(signum: int, frame: object) -> None:
        raise JobStopped(
            "stopped by SIGTERM (scancel, preemption or the time limit); the rows it finished "
            "are kept: submit the same command again to resume."
        )

    signal.signal(signal.SIGTERM, stop)


def prepare_job(hydra_config: DictConfig) -> None:
    """What a job of a multirun does before it loads anything: its devices, its threads and
    its SIGTERM."""
    narrow_local_devices(int(hydra_config.job.get("num") or 0))
    limit_threads(hydra_config.get("launcher"))
    stop_on_sigterm()
