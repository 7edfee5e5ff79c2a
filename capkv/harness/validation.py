"""Check a composed config before any work: every value a user can pass, one sentence per fault.

:func:`check_config` runs when a run is planned, before a model loads or a row is written. It
checks the top-level keys (types, integers where a count is meant, non-empty lists where a list is
meant, a results folder that can be written), every key of the model, task and method configs
against the fields of the dataclass their ``_target_`` builds (unknown keys, wrong types, empty
lists), and that the model's device exists on this machine. Ranges that only a class knows
(a method's window against a budget, a task's depths) stay in that class's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from capkv.engine.decoding import check_head_masking
from capkv.engine.method import EvictionMethod
from capkv.engine.quantization import CacheQuantization, run_storages
from capkv.harness.runner import SHARED_PROTOCOLS, check_protocol
from capkv.models.loading import check_model_source
from capkv.models.support import resolve_attn_implementation


def shown(value: Any) -> str:
    """A value as it is written on the command line (lists as ``[a,b]``)."""
    if isinstance(value, list | tuple):
        return "[" + ",".join(shown(v) for v in value) + "]"
    if value is None:
        return "null"
    return str(value) if not isinstance(value, str) else repr(value)


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_count(key: str, value: Any, *, optional: bool = True, example: int = 512) -> None:
    """``value`` is a positive whole number (or None when ``optional``)."""
    if value is None and optional:
        return
    if not is_integer(value) or value < 1:
        what = "not positive" if is_integer(value) else "not a whole number"
        alternative = f", or {key}=null" if optional else ""
        raise ValueError(
            f"{key}={shown(value)} is {what}; pass a positive whole number, e.g. {key}={example}"
            f"{alternative}."
        )


def check_list(key: str, value: Any, example: str) -> list[Any] | None:
    """``value`` is None or a non-empty list; return it as a plain list."""
    if value is None:
        return None
    if not isinstance(value, list | tuple):
        raise ValueError(f"{key}={shown(value)} is not a list; pass {key}={example}.")
    if not value:
        raise ValueError(
            f"{key}=[] is empty (nothing would run); pass {key}={example}, or leave it out."
        )
    return list(value)


def check_budgets(cfg: dict[str, Any]) -> None:
    """``budget``/``ratio``/``default_budget`` and the sweep lists ``budgets``/``ratios``."""
    if cfg.get("budget") is not None and not is_integer(cfg["budget"]):
        budget = cfg["budget"]
        what = (
            "not a number"
            if not is_number(budget)
            else ("written as a decimal" if float(budget).is_integer() else "a fraction")
        )
        raise ValueError(
            f"budget={shown(budget)} is {what}; pass a whole number of tokens kept per KV "
            "head (budget=512), or ratio=R for the fraction of the prompt removed."
        )
    if cfg.get("ratio") is not None and not is_number(cfg["ratio"]):
        raise ValueError(
            f"ratio={shown(cfg['ratio'])} is not a number; pass the fraction of the prompt "
            "removed, e.g. ratio=0.5."
        )
    check_count("default_budget", cfg.get("default_budget"), optional=False)
    for tokens in check_list("budgets", cfg.get("budgets"), "[128,512]") or []:
        if not is_integer(tokens) or tokens < 1:
            raise ValueError(
                f"budgets={shown(cfg['budgets'])} holds {shown(tokens)}, not a positive whole "
                "number of tokens; pass e.g. budgets=[128,512], or ratios=[0.5] for fractions."
            )
    for ratio in check_list("ratios", cfg.get("ratios"), "[0.5,0.75]") or []:
        if not is_number(ratio):
            raise ValueError(
                f"ratios={shown(cfg['ratios'])} holds {shown(ratio)}, not a number; pass "
                "fractions of the prompt removed, e.g. ratios=[0.5,0.75]."
            )
    check_byte_budgets(cfg)


def check_byte_budgets(cfg: dict[str, Any]) -> None:
    """``kv_bytes``/``kv_fraction`` and the sweep lists ``kv_byte_budgets``/``kv_fractions``."""
    check_count("kv_bytes", cfg.get("kv_bytes"), example=8192)
    for kv_bytes in check_list("kv_byte_budgets", cfg.get("kv_byte_budgets"), "[4096,8192]") or []:
        if not is_integer(kv_bytes) or kv_bytes < 1:
            raise ValueError(
                f"kv_byte_budgets={shown(cfg['kv_byte_budgets'])} holds {shown(kv_bytes)}, not a "
                "positive whole number of bytes per KV head and layer; pass e.g. "
                "kv_byte_budgets=[4096,8192]."
            )
    fractions = check_list("kv_fractions", cfg.get("kv_fractions"), "[0.5,0.25]") or []
    for key, fraction in [("kv_fraction", cfg.get("kv_fraction"))] + [
        ("kv_fractions", fraction) for fraction in fractions
    ]:
        if fraction is not None and (not is_number(fraction) or not 0 < fraction <= 1):
            raise ValueError(
                f"{key}={shown(cfg[key])} holds {shown(fraction)}, not a share of the full "
                f"cache's bytes in (0, 1]; pass e.g. {key}="
                f"{'0.25' if key == 'kv_fraction' else '[0.5,0.25]'}."
            )


def check_results_dir(value: Any) -> None:
    """``results_dir`` is a folder (or can become one) that this process can write into."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"results_dir={shown(value)} is not a path; pass results_dir=FOLDER.")
    path = Path(to_absolute_path(value))
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"results_dir={value} is a file, not a folder; pass results_dir=<a folder>, which is "
            "created if missing."
        )
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(
            f"results_dir={value} lies under {existing}, which is a file; pass "
            "results_dir=<a folder>."
        )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(
            f"results_dir={value} cannot be written ({existing}: {error.strerror}); pass "
            "results_dir=<a folder you can write to>."
        ) from error


def check_device(device: Any) -> None:
    """``model.device`` names a device this machine has."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"model.device={shown(device)} is not a device; pass model.device=cpu, "
            "model.device=cuda or model.device=cuda:N."
        ) from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"model.device={device} but this machine has no CUDA GPU that torch can use; "
                "pass model.device=cpu (or install the CUDA build of torch on a GPU machine)."
            )
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(
                f"model.device={device} but this machine has {count} CUDA GPU(s), cuda:0 to "
                f"cuda:{count - 1}; pass one of those."
            )
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(
                f"model.device={device} but Apple's MPS is not available here; pass "
                "model.device=cpu."
            )
    elif parsed.type != "cpu":
        raise ValueError(
            f"model.device={device} is not supported; pass model.device=cpu or model.device=cuda."
        )


# ------------------------------------------------------------------ group configs vs dataclasses


def type_name(hint: Any) -> str:
    """How a field's type reads in a message."""
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}
    if hint in names:
        return names[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple):
        return f"a list of {type_name(args[0]).removeprefix('a ')}s" if args else "a list"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) if a is not type(None) else "null" for a in args)
    return getattr(hint, "__name__", str(hint))


def matches(value: Any, hint: Any) -> bool:
    """Whether a config value fits a field's type hint (types the check cannot judge pass)."""
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return is_integer(value)
    if hint is float:
        return is_number(value)
    if hint is str:
        return isinstance(value, str)
    if hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arm) for arm in args)
    if origin in (list, tuple):
        return isinstance(value, list | tuple) and all(matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(hint, type) and hint.__module__ == "builtins":
        return isinstance(value, hint)
    return True  # a class such as torch.dtype: never given on the command line


def check_against_target(prefix: str, node: dict[str, Any]) -> None:
    """Every key of a ``_target_`` config is a field of that dataclass and has its type.

    Parameters
    ----------
    prefix : str
        How the node is addressed on the command line (``method``, ``task``, ``model``).
    node : dict
        The resolved config node, with its ``_target_``.
    """
    target = node.get("_target_")
    try:
        cls = get_class(target) if isinstance(target, str) else None
    except Exception:
        raise ValueError(
            f"{prefix}._target_={target!r} names no class that can be imported; fix the "
            f"{prefix} config's _target_."
        ) from None
    if cls is None or not dataclasses.is_dataclass(cls):
        return
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key, value in node.items():
        if key.startswith("_"):
            continue
        if key not in fields:
            raise ValueError(
                f"{prefix}.{key} is not a setting of {cls.__name__}; its settings are "
                f"{', '.join(fields)}. Fix the key's spelling."
            )
        hint = hints.get(key, Any)
        if isinstance(value, list) and not value and typing.get_origin(hint) is not None:
            raise ValueError(f"{prefix}.{key}=[] is empty; give at least one value.")
        if not matches(value, hint):
            default = fields[key].default
            example = (
                f", e.g. {prefix}.{key}={shown(default)}"
                if default is not dataclasses.MISSING and default is not None
                else ""
            )
            raise ValueError(
                f"{prefix}.{key}={shown(value)} is not {type_name(hint)}; pass "
                f"{type_name(hint)}{example}."
            )


def check_allocation(method: EvictionMethod, attn_implementation: str) -> None:
    """A head-adaptive allocation (``method.allocation``) needs an attention implementation that
    masks each KV head's own kept tokens (eager or sdpa); the method's own checks (a floor in
    [0, 1], an allocation its scores allow) ran when it was built."""
    if method.allocation != "uniform":
        check_head_masking(resolve_attn_implementation(attn_implementation))


def check_missing(cfg: DictConfig) -> None:
    """Mandatory values (``???``) that were not given, e.g. ``task.path`` of ``task=custom``."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key = missing[0]
        raise ValueError(f"{key} has no value; pass {key}=<value> on the command line.")


def method_nodes(plain: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The chosen method's config; in sweep mode, ``methods`` must be a non-empty list of names
    (unknown names are refused when the cells are planned)."""
    names = check_list("methods", plain.get("methods"), "[capkv,snapkv]") or []
    for name in names:
        if not isinstance(name, str):
            raise ValueError(
                f"methods={shown(names)} holds {shown(name)}, not a method name; pass e.g. "
                "methods=[capkv,snapkv]."
            )
    return [("method", plain["method"])]


def check_press_attention(plain: dict[str, Any]) -> None:
    """A kvpress press that scores from attention weights runs only with eager attention."""
    from capkv.interop.scorers import NEEDS_ATTENTIONS, press_class_name

    presses = [name for name in plain.get("methods") or [] if name.startswith("kvpress-")]
    if plain["method"].get("_target_") == "capkv.interop.KvpressMethod":
        presses.append(plain["method"].get("press") or "")
    attention = plain["model"].get("attn_implementation")
    for name in presses:
        try:
            press = press_class_name(name)
        except ValueError:
            continue  # an unknown press is refused, with the supported ones, when it is built
        if press in NEEDS_ATTENTIONS and attention != "eager":
            raise ValueError(
                f"{press} scores from the attention weights, which only eager attention returns, "
                f"and model.attn_implementation={attention}: pass model.attn_implementation=eager."
            )


def check_streaming(plain: dict[str, Any]) -> None:
    """``chunk`` and ``compress_every`` are positive whole numbers or null, and streaming runs
    without the one-shot diagnostics (they measure a compression of the whole prompt)."""
    check_count("chunk", plain.get("chunk"), example=512)
    check_count("compress_every", plain.get("compress_every"), example=64)
    streaming = plain.get("chunk") is not None or plain.get("compress_every") is not None
    task = get_class(plain["task"]["_target_"])
    reads = hasattr(task, "evaluate") and not getattr(task, "generates", False)  # a reading task
    if reads and plain.get("compress_every") is not None:
        raise ValueError(
            f"compress_every={plain['compress_every']} bounds generation, and task="
            f"{plain['task'].get('name', 'this task')} generates nothing; drop compress_every "
            "(chunk= sets how the text is read)."
        )
    if streaming and plain.get("diagnostics"):
        raise ValueError(
            "diagnostics=true measures one compression of the whole prompt, which streaming "
            "(chunk= or compress_every=) does not make; drop diagnostics=true or the streaming keys."
        )


def check_shared_context(plain: dict[str, Any]) -> None:
    """``accumulate`` is true or false and asks for a shared-context protocol; a shared-context
    protocol reads its context in chunks at most (nothing compresses its turns), and never
    batches accumulating turns."""
    accumulate = plain.get("accumulate", False)
    if not isinstance(accumulate, bool):
        raise ValueError(
            f"accumulate={shown(accumulate)} is not true or false; pass accumulate=true or "
            "accumulate=false."
        )
    shared = plain["protocol"] in SHARED_PROTOCOLS
    if accumulate and not shared:
        raise ValueError(
            f"accumulate=true keeps each question and answer of a shared context in the cache, "
            f"and protocol={plain['protocol']} asks one question per prompt; pass "
            "protocol=shared_context (or shared_first_question), or drop accumulate=true."
        )
    if shared and plain.get("compress_every") is not None:
        raise ValueError(
            f"compress_every={plain['compress_every']} compresses while answering, and "
            f"protocol={plain['protocol']} crops each question and answer back off the "
            "compressed context; drop compress_every= (chunk= reads the context in chunks)."
        )
    if accumulate and plain.get("chunk") is not None:
        raise ValueError(
            f"accumulate=true with chunk={plain['chunk']} would let every turn grow the cache "
            "past budget + chunk (turns are not compressed as they accumulate); drop chunk= or "
            "accumulate=true."
        )
    if accumulate and plain.get("decode_batch"):
        raise ValueError(
            "decode_batch=true cannot decode accumulating turns together (each cell's cache "
            "grows with its own answers); drop decode_batch=true or accumulate=true."
        )


def check_quantization(plain: dict[str, Any]) -> None:
    """The ``cache:`` section and every ``caches=[...]`` entry name an installed backend with
    settings it takes, and a quantized cache is asked only where it is decoded from once: not
    streamed, not cropped between questions, not padded into a batch."""
    node = plain.get("cache")
    if node is None:
        return
    check_against_target("cache", node)
    base = CacheQuantization(**{k: v for k, v in node.items() if not k.startswith("_")})
    settings = run_storages(base, check_list("caches", plain.get("caches"), "[bf16,hqq4]"))
    for storage in settings:
        storage.check()
    active = [storage for storage in settings if storage.active]
    if not active:
        return
    backend = f"cache.quantization={active[0].quantization}"
    if plain.get("chunk") is not None or plain.get("compress_every") is not None:
        raise ValueError(
            f"{backend} stores a cache compressed once, and streaming (chunk= or "
            "compress_every=) compresses it again as it grows; drop the streaming keys or "
            "cache.quantization."
        )
    if plain.get("protocol") in SHARED_PROTOCOLS:
        raise ValueError(
            f"{backend} cannot crop each question off a quantized cache, which "
            f"protocol={plain['protocol']} needs; use protocol=query_aware or context_only, or "
            "drop cache.quantization."
        )
    if plain.get("decode_batch"):
        raise ValueError(
            f"{backend} decodes each cell from its own quantized cache, and decode_batch=true "
            "pads full-precision caches into one batch; drop decode_batch=true."
        )


def check_config(cfg: DictConfig) -> None:
    """Refuse a composed run config with one sentence, before any model loads or row is written.

    Parameters
    ----------
    cfg : DictConfig
        The config Hydra composed for the run (``conf/config.yaml`` with overrides).

    Raises
    ------
    ValueError
        Naming the key, the value and what to pass instead.
    """
    check_missing(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True)
    check_budgets(plain)
    check_count("max_examples", plain.get("max_examples"), example=5)
    if not isinstance(plain.get("diagnostics"), bool):
        raise ValueError(
            f"diagnostics={shown(plain.get('diagnostics'))} is not true or false; pass "
            "diagnostics=true or diagnostics=false."
        )
    if plain.get("decode_batch") is not None and not isinstance(plain["decode_batch"], bool):
        raise ValueError(
            f"decode_batch={shown(plain.get('decode_batch'))} is not true, false or null; pass "
            "decode_batch=true (batched), decode_batch=false (one by one) or decode_batch=null "
            "(batched on CUDA only)."
        )
    if not isinstance(plain.get("protocol"), str):
        raise ValueError(f"protocol={shown(plain.get('protocol'))} is not a protocol name.")
    check_protocol(plain["protocol"])
    check_shared_context(plain)
    variant = plain.get("variant")
    if not isinstance(variant, str | int) or isinstance(variant, bool) or "/" in str(variant):
        raise ValueError(
            f"variant={shown(variant)} cannot name a folder; pass a short name, e.g. variant=tau3."
        )
    for prefix, node in [("model", plain["model"]), ("task", plain["task"])]:
        check_against_target(prefix, node)
    for prefix, node in method_nodes(plain):
        check_against_target(prefix, node)
    check_press_attention(plain)
    check_streaming(plain)
    check_quantization(plain)
    model = instantiate(cfg.model)  # the model config's own checks (dtype, attention)
    check_device(plain["model"].get("device", "cpu"))
    check_model_source(model.name, model.cache_dir)  # before the plan, not when it loads
    check_results_dir(plain.get("results_dir"))
