"""What run.py does with a composed Hydra config: validate, load, run, print, aggregate."""

from __future__ import annotations

import logging
import sys
from functools import cache
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf
from transformers.utils import logging as transformers_logging

from capkv.engine.budget import Budget
from capkv.engine.compression import resolve_budget
from capkv.engine.hooks import library_versions
from capkv.engine.method import EvictionMethod
from capkv.engine.streaming import StreamSettings, check_streamable
from capkv.harness.cluster import check_launcher, launcher_choice, prepare_job
from capkv.harness.runner import (
    Cell,
    CellBusy,
    busy_message,
    check_protocol,
    check_same_config,
    run_cell,
    shard_lock_path,
)
from capkv.harness.shards import Shard
from capkv.harness.sweep import run_sweep
from capkv.harness.validation import check_allocation, check_config
from capkv.interop import press_class_name
from capkv.results.format import markdown
from capkv.results.store import identity_directory, method_label, run_identity
from capkv.results.tables import aggregate
from capkv.storage.locking import is_held
from capkv.tasks.base import capped

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ("model", "method", "task", "experiment")
SWEEP_KEYS = ("methods", "budgets", "ratios")
SHARD_KEYS = ("shards", "shard")  # which examples a process runs, not what a cell holds
PRESS_PREFIX = "kvpress-"  # methods=[kvpress-tova]: a kvpress press (capkv.interop)


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


def choose_budget(cfg: DictConfig, method: EvictionMethod) -> Budget | None:
    """The run's budget: at most one convention given, else ``default_budget`` tokens."""
    if cfg.budget is not None and cfg.ratio is not None:
        raise ValueError(
            f"Both budget={cfg.budget} and ratio={cfg.ratio} were given; pass only one of them."
        )
    if cfg.budget is None and cfg.ratio is None:
        return resolve_budget(method, cfg.default_budget if method.evicts else None, None)
    return resolve_budget(method, cfg.budget, cfg.ratio)


def sweep_mode(cfg: DictConfig) -> bool:
    return any(cfg.get(key) is not None for key in SWEEP_KEYS)


def method_config(cfg: DictConfig, name: str, chosen: str) -> DictConfig:
    """The config of method ``name``: the composed one (with its overrides) if it was chosen
    with ``method=``, else its file under conf/method/."""
    if name == chosen:
        return cfg.method
    if name.startswith(PRESS_PREFIX):  # a kvpress press with its default settings
        press_cfg = OmegaConf.load(CONF_DIR / "method" / "kvpress.yaml")
        press_cfg.press = press_class_name(name)
        return press_cfg
    path = CONF_DIR / "method" / f"{name}.yaml"
    if not path.exists():
        valid = ", ".join(group_options("method"))
        raise ValueError(f"Unknown method {name!r} in methods; choose from: {valid}.")
    return OmegaConf.load(path)


def planned_budgets(cfg: DictConfig, method: EvictionMethod) -> list[Budget | None]:
    """Budgets of a sweep: every budgets/ratios entry (the full cache runs once)."""
    if not method.evicts:
        return [None]
    if cfg.budget is not None or cfg.ratio is not None:
        raise ValueError(
            "A sweep takes its budgets from budgets=[...] and ratios=[...]; drop budget= and ratio=."
        )
    budgets = [resolve_budget(method, tokens, None) for tokens in cfg.get("budgets") or []]
    budgets += [resolve_budget(method, None, ratio) for ratio in cfg.get("ratios") or []]
    if not budgets:
        budgets = [resolve_budget(method, cfg.default_budget, None)]
    return budgets


def plan_cells(cfg: DictConfig, task_name: str) -> list[Cell]:
    """Every (method, budget) cell the config asks for, with its run directory and config, on
    the examples of shard ``shard`` of ``shards``."""
    choices = HydraConfig.get().runtime.choices
    check_protocol(cfg.protocol)
    sweeping = sweep_mode(cfg)
    names = list(cfg.methods) if sweeping and cfg.methods else [choices["method"]]
    shard = Shard(cfg.shard, cfg.shards)
    stream = StreamSettings(cfg.get("chunk"), cfg.get("compress_every"))
    variant = "-".join(part for part in (str(cfg.variant or ""), stream.label) if part)
    results_dir = Path(to_absolute_path(cfg.results_dir))
    base = OmegaConf.to_container(cfg, resolve=True)
    for key in (*SWEEP_KEYS, *SHARD_KEYS):
        base.pop(key, None)
    cells = []
    for name in names:
        method_cfg = method_config(cfg, name, choices["method"])
        method: EvictionMethod = instantiate(method_cfg)
        check_allocation(method, cfg.model.attn_implementation)
        if stream.active:
            check_streamable(method)
        budgets = planned_budgets(cfg, method) if sweeping else [choose_budget(cfg, method)]
        for budget in budgets:
            label = getattr(method, "folder_name", name)  # kvpress-tova for method=kvpress
            identity = run_identity(
                choices["model"], task_name, label, variant, budget, cfg.protocol
            )
            resolved = {
                **base,
                "method": OmegaConf.to_container(method_cfg, resolve=True),
                "budget": budget.tokens if budget is not None else None,
                "ratio": budget.ratio if budget is not None else None,
                "versions": library_versions(),
            }
            run_dir = identity_directory(results_dir, identity)
            check_same_config(run_dir, resolved)
            if is_held(shard_lock_path(run_dir, shard)):
                raise CellBusy(busy_message(run_dir, shard))
            cells.append(Cell(method, budget, run_dir, identity, shard, resolved, stream))
    return cells


def unshared_prefill(cfg: DictConfig, task: Any, cells: list[Cell]) -> str | None:
    """Why the cells of this run cannot share one prefill per example (so none decode together),
    or None where they can: a sweep whose cells neither stream nor read texts."""
    if not sweep_mode(cfg):
        return "it is one cell (a sweep is methods=[...] with budgets=[...] or ratios=[...])"
    if any(cell.stream.active for cell in cells):
        return (
            "its cells stream (chunk= or compress_every=), each cell's cache shaping the rest of "
            "its own reading"
        )
    if getattr(task, "evaluate", None) is not None:
        return f"task={task.name} reads its texts and generates nothing"
    return None


def check_decode_batch(cfg: DictConfig, apart: str | None) -> None:
    """``decode_batch=true`` where no cells decode together is refused, never silently ignored."""
    if cfg.get("decode_batch") and apart is not None:
        raise ValueError(
            f"decode_batch=true has no cells to decode together: {apart}; drop decode_batch=true."
        )


def run_from_config(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run the cell (or, with methods/budgets/ratios lists, the sweep) ``cfg`` describes, on
    the examples of shard ``shard`` of ``shards``."""
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    check_config(cfg)
    task = capped(instantiate(cfg.task), cfg.max_examples)
    cells = plan_cells(cfg, task.name)
    apart = unshared_prefill(cfg, task, cells)
    check_decode_batch(cfg, apart)
    if in_multirun():
        prepare_job(HydraConfig.get())
    model, tokenizer = load_model_cached(OmegaConf.to_yaml(cfg.model))
    if apart is None:
        all_metrics = run_sweep(
            model,
            tokenizer,
            task,
            cells,
            cfg.protocol,
            diagnostics=cfg.diagnostics,
            decode_batch=cfg.get("decode_batch"),
        )
    else:
        all_metrics = [run_cell(model, tokenizer, task, cell, cfg.protocol) for cell in cells]
    if (
        not in_multirun()
    ):  # a multirun rebuilds the tables once, at its end (capkv.harness.callbacks)
        aggregate(Path(to_absolute_path(cfg.results_dir)))
    for cell, metrics in zip(cells, all_metrics, strict=True):
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
