"""What run.py does with a composed Hydra config: validate, load, run, print, aggregate."""

from __future__ import annotations

import logging
import sys
from functools import cache
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from capkv.budget import Budget
from capkv.engine import resolve_budget
from capkv.method import EvictionMethod
from capkv.results import CONFIG, aggregate, markdown, run_directory, write_atomically
from capkv.runner import PROTOCOLS, run_cell

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "method", "task")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_group_choices(argv: list[str]) -> None:
    """Refuse unknown ``model=``/``method=``/``task=`` choices with one line listing the valid ones.

    Runs before Hydra composes the config, whose own error is a multi-line trace.
    """
    for argument in argv:
        key, _, value = argument.lstrip("+~").partition("=")
        if key not in GROUPS or not value:
            continue
        valid = group_options(key)
        for choice in value.split(","):
            if choice.strip() not in valid:
                sys.exit(
                    f"error: unknown {key} {choice.strip()!r}; choose one of: {', '.join(valid)}."
                )


@cache
def load_model_cached(model_yaml: str) -> tuple[Any, Any]:
    """Load each model once per process, so a multirun sweep does not reload it per job."""
    return instantiate(OmegaConf.create(model_yaml)).load()


def choose_budget(cfg: DictConfig, method: EvictionMethod) -> Budget | None:
    """The run's budget: at most one convention given, else ``default_budget`` tokens."""
    if cfg.budget is not None and cfg.ratio is not None:
        raise ValueError(
            f"Both budget={cfg.budget} and ratio={cfg.ratio} were given; pass only one of them."
        )
    if cfg.budget is None and cfg.ratio is None:
        return resolve_budget(method, cfg.default_budget if method.evicts else None, None)
    return resolve_budget(method, cfg.budget, cfg.ratio)


def check_same_config(run_dir: Path, resolved: dict[str, Any]) -> None:
    """A directory holding results of other settings is never silently extended."""
    stored_path = run_dir / CONFIG
    if not stored_path.exists():
        return
    stored = OmegaConf.to_container(OmegaConf.load(stored_path))
    differing = [
        f"{section}.{key}"
        for section in ("model", "method", "task")
        for key in sorted(set(stored.get(section, {})) | set(resolved[section]))
        if key != "max_examples" and stored[section].get(key) != resolved[section].get(key)
    ]
    if differing:
        raise ValueError(
            f"{run_dir} holds results of other settings (differs in {', '.join(differing)}); "
            "pass variant=NAME to write them elsewhere, or delete that folder."
        )


def run_from_config(cfg: DictConfig) -> dict[str, Any]:
    """Run the cell that ``cfg`` describes and return its metrics."""
    choices = HydraConfig.get().runtime.choices
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(
            f"Unknown protocol {cfg.protocol!r}; choose one of: {', '.join(PROTOCOLS)}."
        )
    method: EvictionMethod = instantiate(cfg.method)
    budget = choose_budget(cfg, method)
    task = instantiate(cfg.task)
    method_name = choices["method"] + (f"-{cfg.variant}" if cfg.variant else "")
    identity = {
        "model": choices["model"],
        "task": task.name,
        "method": method_name,
        "budget": budget.label if budget is not None else "full",
        "protocol": cfg.protocol,
    }
    results_dir = Path(to_absolute_path(cfg.results_dir))
    run_dir = run_directory(results_dir, **identity)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    check_same_config(run_dir, resolved)
    model, tokenizer = load_model_cached(OmegaConf.to_yaml(cfg.model))
    metrics = run_cell(model, tokenizer, task, method, budget, cfg.protocol, run_dir, identity)
    write_atomically(run_dir / CONFIG, OmegaConf.to_yaml(resolved))
    aggregate(results_dir)
    print_metrics(metrics, run_dir)
    return metrics


def print_metrics(metrics: dict[str, Any], run_dir: Path) -> None:
    """The run's scores as a Markdown table, overall and per subtask."""
    import pandas as pd

    rows = [{"subtask": "average", **metrics["scores"]}]
    rows += [{"subtask": name, **scores} for name, scores in metrics["subtasks"].items()]
    title = (
        f"{metrics['model']} | {metrics['task']} | {metrics['method']} | {metrics['budget']} | "
        f"{metrics['protocol']} | {metrics['n_examples']} examples, mean "
        f"{metrics['mean_kept_tokens']:.0f} of {metrics['mean_prompt_tokens']:.0f} tokens kept"
    )
    print(f"\n{title}\n\n{markdown(pd.DataFrame(rows))}\nwritten to {run_dir}\n")
