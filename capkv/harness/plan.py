"""The typed plan of a run: the composed Hydra config checked and turned, once, into the task,
the (method, budget) cells with their folders, and how they run. Nothing below the harness
reads the raw config; :func:`plan_run` is the one place that does."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from capkv.engine.budget import Budget, ByteBudget
from capkv.engine.compression import resolve_budget
from capkv.engine.hooks import library_versions
from capkv.engine.kv_bytes import KVShape, byte_budget
from capkv.engine.method import EvictionMethod
from capkv.engine.quantization import CacheQuantization, run_storages
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
TOKEN_KEYS = ("budget", "ratio")  # one cell's budget in tokens or as a ratio
BYTE_KEYS = ("kv_bytes", "kv_fraction")  # one cell's budget in bytes
BYTE_SWEEP_KEYS = ("kv_byte_budgets", "kv_fractions")
SWEEP_KEYS = ("methods", "budgets", "ratios", *BYTE_SWEEP_KEYS, "caches")
SHARD_KEYS = ("shards", "shard")  # which examples a process runs, not what a cell holds
ACCUMULATE = "accumulate"  # the variant of a shared-context run whose turns stay in the cache
STORAGE_TARGET = f"{CacheQuantization.__module__}.{CacheQuantization.__qualname__}"
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


def choose_budget(
    cfg: DictConfig, method: EvictionMethod, storage: CacheQuantization, shape: KVShape | None
) -> Budget | None:
    """The run's budget: at most one convention given (tokens, a ratio, or bytes), else
    ``default_budget`` tokens."""
    given = [key for key in (*TOKEN_KEYS, *BYTE_KEYS) if cfg.get(key) is not None]
    if len(given) > 1:
        values = " and ".join(f"{key}={cfg.get(key)}" for key in given)
        raise ValueError(
            f"Both {values} were given; pass only one of them (a budget in tokens, a ratio, "
            "kv_bytes or kv_fraction)."
        )
    if given and given[0] in BYTE_KEYS:
        return bytes_as_budget(method, cfg.get("kv_bytes"), cfg.get("kv_fraction"), storage, shape)
    if not given:
        return resolve_budget(method, cfg.default_budget if method.evicts else None, None)
    return resolve_budget(method, cfg.budget, cfg.ratio)


def bytes_as_budget(
    method: EvictionMethod,
    kv_bytes: int | None,
    kv_fraction: float | None,
    storage: CacheQuantization,
    shape: KVShape,
) -> Budget | None:
    """The tokens (or ratio) a byte budget buys ``method`` in ``storage`` (None: no eviction)."""
    if not method.evicts:
        return None
    budget = byte_budget(kv_bytes, kv_fraction, shape, storage)
    try:
        return resolve_budget(method, budget, None)
    except ValueError as error:
        held = (
            f"{budget.tokens} tokens" if budget.tokens else f"{1 - budget.ratio:.1%} of the tokens"
        )
        where = storage.label or "the model's precision"
        raise ValueError(f"{budget.label} holds {held} per KV head in {where}: {error}") from None


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


def planned_budgets(
    cfg: DictConfig, method: EvictionMethod, storage: CacheQuantization, shape: KVShape | None
) -> list[Budget | None]:
    """Budgets of a sweep: every budgets/ratios/kv_byte_budgets/kv_fractions entry (the full
    cache runs once per storage)."""
    if not method.evicts:
        return [None]
    singles = [key for key in (*TOKEN_KEYS, *BYTE_KEYS) if cfg.get(key) is not None]
    if singles:
        raise ValueError(
            "A sweep takes its budgets from budgets=[...], ratios=[...], kv_byte_budgets=[...] "
            f"and kv_fractions=[...]; drop {'= and '.join(singles)}=."
        )
    budgets = [resolve_budget(method, tokens, None) for tokens in cfg.get("budgets") or []]
    budgets += [resolve_budget(method, None, ratio) for ratio in cfg.get("ratios") or []]
    budgets += [
        bytes_as_budget(method, kv_bytes, None, storage, shape)
        for kv_bytes in cfg.get("kv_byte_budgets") or []
    ]
    budgets += [
        bytes_as_budget(method, None, fraction, storage, shape)
        for fraction in cfg.get("kv_fractions") or []
    ]
    if not budgets:
        budgets = [resolve_budget(method, cfg.default_budget, None)]
    return budgets


def storages(cfg: DictConfig) -> list[CacheQuantization]:
    """How the cells store their caches: the ``cache:`` section, or one storage per entry of
    ``caches=[...]`` (its other settings from that section)."""
    return run_storages(cache_quantization(cfg), cfg.get("caches"))


def cache_shape(cfg: DictConfig) -> KVShape | None:
    """The model's cache shape where the run budgets bytes (None elsewhere: nothing is read)."""
    if not any(cfg.get(key) is not None for key in (*BYTE_KEYS, *BYTE_SWEEP_KEYS)):
        return None
    return KVShape.of(*instantiate(cfg.model).architecture())


def plan_cells(cfg: DictConfig, task_name: str) -> list[Cell]:
    """Every (method, storage, budget) cell the config asks for, with its run directory and
    config, on the examples of shard ``shard`` of ``shards``."""
    choices = HydraConfig.get().runtime.choices
    check_protocol(cfg.protocol)
    sweeping = sweep_mode(cfg)
    names = list(cfg.methods) if sweeping and cfg.methods else [choices["method"]]
    shard = Shard(cfg.shard, cfg.shards)
    stream = StreamSettings(cfg.get("chunk"), cfg.get("compress_every"))
    shape = cache_shape(cfg)
    turns = ACCUMULATE if cfg.get("accumulate") else ""
    results_dir = Path(to_absolute_path(cfg.results_dir))
    base = OmegaConf.to_container(cfg, resolve=True)
    for key in (*SWEEP_KEYS, *SHARD_KEYS, *BYTE_KEYS):
        base.pop(key, None)
    cells = []
    for name in names:
        method_cfg = method_config(cfg, name, choices["method"])
        method: EvictionMethod = instantiate(method_cfg)
        check_allocation(method, cfg.model.attn_implementation)
        if stream.active:
            check_streamable(method)
        for storage in storages(cfg):
            parts = (str(cfg.variant or ""), stream.label, storage.label, turns)
            variant = "-".join(part for part in parts if part)
            budgets = (
                planned_budgets(cfg, method, storage, shape)
                if sweeping
                else [choose_budget(cfg, method, storage, shape)]
            )
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
                    **byte_fields(budget),
                    "versions": library_versions(),
                }
                if storage.active:  # an unquantized cell's config.yaml is as before the section
                    resolved["cache"] = storage_config(storage)
                else:
                    resolved.pop("cache", None)
                run_dir = identity_directory(results_dir, identity)
                check_same_config(run_dir, resolved)
                if is_held(shard_lock_path(run_dir, shard)):
                    raise CellBusy(busy_message(run_dir, shard))
                check_one_shard_count(run_dir, shard)
                cells.append(
                    Cell(
                        *(method, budget, run_dir, identity, shard, resolved, stream, storage),
                        measure_bytes=shape is not None,  # a run budgeting bytes
                    )
                )
    return cells


def byte_fields(budget: Budget | None) -> dict[str, Any]:
    """A byte budget's own keys in a cell's config.yaml (none for token budgets and ratios)."""
    if not isinstance(budget, ByteBudget):
        return {}
    return {"kv_bytes": budget.kv_bytes, "kv_fraction": budget.kv_fraction}


def storage_config(storage: CacheQuantization) -> dict[str, Any]:
    """The ``cache:`` section of a cell's config.yaml: its own storage, as Hydra builds it."""
    return {"_target_": STORAGE_TARGET, **dataclasses.asdict(storage)}


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
    quantized = [storage for storage in storages(cfg) if storage.active]
    if quantized and getattr(task, "evaluate", None) is not None:
        raise ValueError(
            f"cache.quantization={quantized[0].quantization} quantizes the cache an answer is "
            f"decoded from, and task={task.name} decodes none of its own; drop cache.quantization "
            "(and caches=) or use a question-answering task."
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
