"""What run.py does with a composed Hydra config: validate, load, run, print, aggregate."""

from __future__ import annotations

import logging
import sys
from functools import cache
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers.utils import logging as transformers_logging

from capkv.harness.cluster import check_launcher, launcher_choice, prepare_job
from capkv.harness.plan import CONF_DIR, PRESS_PREFIX, RunPlan, plan_run
from capkv.harness.runner import SHARED_PROTOCOLS, run_cell
from capkv.harness.shared_context import run_shared_cell, run_shared_sweep
from capkv.harness.sweep import run_sweep
from capkv.interop import press_class_name
from capkv.results.format import markdown
from capkv.results.store import method_label
from capkv.results.tables import aggregate

log = logging.getLogger(__name__)

GROUPS = ("model", "method", "task", "experiment")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_group_choices(argv: list[str]) -> None:
    """Refuse unknown ``model=``/``method=``/``task=`` choices with one line listing the valid ones.

    Runs before Hydra composes the config, whose own error is a multi-line trace.
    """
    for argument in argv:
        key, _, value = argument.lstrip("+~").partition("=")
        listed = key == "methods"
        if listed:
            key, value = "method", value.strip("[]")
        if key not in GROUPS or not value:
            continue
        valid = group_options(key)
        for choice in value.split(","):
            if key == "method" and choice.strip().startswith(PRESS_PREFIX):
                check_press_choice(choice.strip(), listed)
            elif choice.strip() not in valid:
                sys.exit(
                    f"error: unknown {key} {choice.strip()!r}; choose one of: {', '.join(valid)}."
                )
    launcher = launcher_choice(argv)
    if launcher is not None:
        try:
            check_launcher(launcher)
        except ValueError as error:
            sys.exit(f"error: {error}")


def check_press_choice(choice: str, listed: bool) -> None:
    """``kvpress-tova`` in ``methods=[...]`` names a supported kvpress press, or the run stops;
    ``method=`` takes the press as ``method=kvpress method.press=...``."""
    try:
        press = press_class_name(choice)
    except ValueError as error:
        sys.exit(f"error: {error}")
    if not listed:
        sys.exit(
            f"error: method={choice} is spelt method=kvpress method.press={press} (kvpress-<name> "
            "is the spelling inside methods=[...])."
        )


def in_multirun() -> bool:
    """Whether this process runs a job of a multirun (``-m``)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def plain_experiment(argv: list[str]) -> list[str]:
    """``argv`` with ``+experiment=NAME`` (the older spelling) written ``experiment=NAME``.

    ``experiment`` is in the defaults list (empty by default), so Hydra refuses the ``+``.
    """
    return [a[1:] if a.startswith("+experiment=") else a for a in argv]


@cache
def load_model_cached(model_yaml: str) -> tuple[Any, Any]:
    """Load each model once per process, so a multirun sweep does not reload it per job."""
    config = instantiate(OmegaConf.create(model_yaml))
    log.info("loading model %s", config.name)
    return config.load()


def run_from_config(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run the cell (or, with methods/budgets/ratios lists, the sweep) ``cfg`` describes, on
    the examples of shard ``shard`` of ``shards``: planned once (:func:`plan_run`), then run."""
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    plan = plan_run(cfg)
    if in_multirun():
        prepare_job(HydraConfig.get())
    return run_plan(plan)


def run_plan(plan: RunPlan) -> list[dict[str, Any]]:
    """Run every cell of ``plan`` (one prefill per example for all of them in sweep mode), then
    rebuild the tables (outside a multirun, which rebuilds them once at its end) and print
    each cell's scores."""
    model, tokenizer = load_model_cached(plan.model_yaml)
    if plan.protocol in SHARED_PROTOCOLS and plan.apart is None:
        all_metrics = run_shared_sweep(
            model,
            tokenizer,
            plan.task,
            plan.cells,
            plan.protocol,
            accumulate=plan.accumulate,
            diagnostics=plan.diagnostics,
            decode_batch=plan.decode_batch,
        )
    elif plan.protocol in SHARED_PROTOCOLS:
        all_metrics = [
            run_shared_cell(model, tokenizer, plan.task, cell, plan.protocol, plan.accumulate)
            for cell in plan.cells
        ]
    elif plan.apart is None:
        all_metrics = run_sweep(
            model,
            tokenizer,
            plan.task,
            plan.cells,
            plan.protocol,
            diagnostics=plan.diagnostics,
            decode_batch=plan.decode_batch,
        )
    else:
        all_metrics = [
            run_cell(model, tokenizer, plan.task, cell, plan.protocol) for cell in plan.cells
        ]
    if not in_multirun():  # a multirun rebuilds the tables once, at its end (callbacks)
        aggregate(plan.results_dir)
    for cell, metrics in zip(plan.cells, all_metrics, strict=True):
        if metrics:
            print_metrics(metrics, cell.run_dir)
    return all_metrics


def print_metrics(metrics: dict[str, Any], run_dir: Path) -> None:
    """The run's scores as a Markdown table, overall and per subtask."""
    import pandas as pd

    rows = [{"subtask": "average", **metrics["scores"]}]
    rows += [{"subtask": name, **scores} for name, scores in metrics["subtasks"].items()]
    title = (
        f"{metrics['model']} | {metrics['task']} | "
        f"{method_label(metrics['method'], metrics['variant'])} | {metrics['budget']} | "
        f"{metrics['protocol']} | {held_examples(metrics)} examples, mean "
        f"{metrics['mean_kept_tokens']:.0f} of {metrics['mean_prompt_tokens']:.0f} tokens kept"
    )
    print(f"\n{title}\n\n{markdown(pd.DataFrame(rows))}\nwritten to {run_dir}\n")


def held_examples(metrics: dict[str, Any]) -> str:
    """``4``, or ``2 of 4`` for a cell whose other shards are missing or unfinished."""
    expected = metrics.get("n_expected", metrics["n_examples"])
    held = metrics["n_examples"]
    return str(held) if held == expected else f"{held} of {expected}"
