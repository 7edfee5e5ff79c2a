"""The typed plan of a run: the composed Hydra config checked and turned, once, into the task,
the (method, budget) cells with their folders, and how they run. Nothing below the harness
reads the raw config; :func:`plan_run` is the one place that does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from capkv.engine.budget import Budget
from capkv.engine.compression import resolve_budget
from capkv.engine.hooks import library_versions
from capkv.engine.method import EvictionMethod
from capkv.engine.quantization import CacheQuantization
from capkv.engine.streaming import StreamSettings, check_streamable
from capkv.harness.runner import (
    SHARED_PROTOCOLS,
    Cell,
    CellBusy,
    busy_message,
    check_one_shard_count,
    check_protocol,
    check_same_config,
    shard_lock_path,
)
from capkv.harness.shards import Shard
from capkv.harness.validation import check_allocation, check_config
from capkv.interop import press_class_name
from capkv.results.store import identity_directory, run_identity
from capkv.storage.locking import is_held
from capkv.tasks.base import SHARED_CONTEXT_TASKS, Task, capped, shares_contexts

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
SWEEP_KEYS = ("methods", "budgets", "ratios")
SHARD_KEYS = ("shards", "shard")  # which examples a process runs, not what a cell holds
ACCUMULATE = "accumulate"  # the variant of a shared-context run whose turns stay in the cache
PRESS_PREFIX = "kvpress-"  # methods=[kvpress-tova]: a kvpress press (capkv.interop)


@dataclass
class RunPlan:
    """What one run (a cell, or a sweep's cells) does, resolved from its config.

    Attributes
    ----------
    model_yaml : str
        The model's config as YAML: what loads it (and the key of the per-process model cache).
    task : Task
        The task, capped to ``max_examples``.
    cells : list of Cell
        Every (method, budget) cell, with its folder, identity, shard and stored config.
    protocol : str
        ``query_aware`` or ``context_only``.
    results_dir : Path
        Where the run folders and tables are (absolute).
    diagnostics : bool
        Whether sweep mode measures the capacity kept and the attention error per cell.
    decode_batch : bool or None
        Whether sweep mode decodes its cells together (None: on CUDA only).
    apart : str or None
        Why the cells cannot share one prefill per example (:func:`unshared_prefill`); None
        where they do (sweep mode).
    accumulate : bool
        Whether a shared-context protocol keeps every question and answer in the cache (the
        multi-turn variant, :mod:`capkv.harness.shared_context`).
    """

    model_yaml: str
    task: Task
    cells: list[Cell]
    protocol: str
    results_dir: Path
    diagnostics: bool = False
    decode_batch: bool | None = None
    apart: str | None = None
    accumulate: bool = False


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
    with ``method=``, else the one Hydra composes for ``method=<name>`` (a kvpress press with
    its default settings for ``kvpress-<press>``)."""
    if name == chosen:
        return cfg.method
    overrides = [f"method={name}"]
    if name.startswith(PRESS_PREFIX):
        overrides = ["method=kvpress", f"method.press={press_class_name(name)}"]
    try:  # inside the run's Hydra app (run.py), which plan_cells needs too
        return compose("config", overrides=overrides).method
    except MissingConfigException:
        valid = ", ".join(sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml")))
        raise ValueError(f"Unknown method {name!r} in methods; choose from: {valid}.") from None


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
    quantization = cache_quantization(cfg)
    turns = ACCUMULATE if cfg.get("accumulate") else ""
    parts = (str(cfg.variant or ""), stream.label, quantization.label, turns)
    variant = "-".join(part for part in parts if part)
    results_dir = Path(to_absolute_path(cfg.results_dir))
    base = OmegaConf.to_container(cfg, resolve=True)
    for key in (*SWEEP_KEYS, *SHARD_KEYS):
        base.pop(key, None)
    if not quantization.active:  # an unquantized cell's config.yaml is as before the section
        base.pop("cache", None)
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
            check_one_shard_count(run_dir, shard)
            cells.append(
                Cell(method, budget, run_dir, identity, shard, resolved, stream, quantization)
            )
    return cells


def cache_quantization(cfg: DictConfig) -> CacheQuantization:
    """How the run stores its compressed caches (``cache:``; full precision without it)."""
    node = cfg.get("cache")
    return instantiate(node) if node is not None else CacheQuantization()


def unshared_prefill(sweeping: bool, task: Any, cells: list[Cell]) -> str | None:
    """Why the cells of this run cannot share one prefill per example (so none decode together),
    or None where they can: a sweep whose cells neither stream nor read texts."""
    if not sweeping:
        return "it is one cell (a sweep is methods=[...] with budgets=[...] or ratios=[...])"
    if any(cell.stream.active for cell in cells):
        return (
            "its cells stream (chunk= or compress_every=), each cell's cache shaping the rest of "
            "its own reading"
        )
    if getattr(task, "evaluate", None) is not None:
        if getattr(task, "generates", False):
            return f"task={task.name} generates each cell's continuations on their own"
        return f"task={task.name} reads its texts and generates nothing"
    return None


def plan_run(cfg: DictConfig) -> RunPlan:
    """Check the composed config and resolve it into a :class:`RunPlan`; every refusal (a bad
    value, a folder of other settings, a cell another process runs) happens here, before any
    model loads."""
    check_config(cfg)
    task = capped(instantiate(cfg.task), cfg.max_examples)
    if cfg.protocol in SHARED_PROTOCOLS and not shares_contexts(task):
        raise ValueError(
            f"protocol={cfg.protocol} asks several questions of each context, and "
            f"task={task.name} asks one per context; use a task with several: "
            f"{SHARED_CONTEXT_TASKS}."
        )
    if cache_quantization(cfg).active and getattr(task, "evaluate", None) is not None:
        raise ValueError(
            f"cache.quantization={cfg.cache.quantization} quantizes the cache an answer is "
            f"decoded from, and task={task.name} decodes none of its own; drop cache.quantization "
            "or use a question-answering task."
        )
    cells = plan_cells(cfg, task.name)
    apart = unshared_prefill(sweep_mode(cfg), task, cells)
    decode_batch = cfg.get("decode_batch")
    if decode_batch and apart is not None:  # refused, never silently ignored
        raise ValueError(
            f"decode_batch=true has no cells to decode together: {apart}; drop decode_batch=true."
        )
    return RunPlan(
        model_yaml=OmegaConf.to_yaml(cfg.model),
        task=task,
        cells=cells,
        protocol=cfg.protocol,
        results_dir=Path(to_absolute_path(cfg.results_dir)),
        diagnostics=bool(cfg.diagnostics),
        decode_batch=decode_batch,
        apart=apart,
        accumulate=bool(cfg.get("accumulate")),
    )
