"""What every model source shares: the supported families, dtypes and attention implementations.

Every model is checked against the families the eviction engine supports (Llama-style attention
modules with ``q_proj``/``k_proj``/``v_proj`` and rotary embeddings).
"""

from __future__ import annotations

import importlib.util

import torch
from transformers import PretrainedConfig, PreTrainedModel

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "auto")
DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def check_supported(model: PreTrainedModel | PretrainedConfig) -> None:
    """Raise if the model's family is not one the eviction engine supports.

    Parameters
    ----------
    model : PreTrainedModel or PretrainedConfig
        A loaded model, or its config.

    Raises
    ------
    ValueError
        If ``config.model_type`` is not in ``SUPPORTED_MODEL_TYPES``.
    """
    config = getattr(model, "config", model)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Model type {model_type!r} is not supported; supported families are "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}."
        )


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """Turn a dtype name ("float32", "bfloat16", "float16", "auto") into what transformers takes.

    Parameters
    ----------
    dtype : str or torch.dtype
        A name from ``DTYPES`` or a ``torch.dtype``.

    Returns
    -------
    torch.dtype or str
        The ``torch.dtype``, or the string ``"auto"`` (keep the checkpoint's dtype).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def resolve_attn_implementation(attn_implementation: str) -> str:
    """``"auto"`` becomes flash_attention_2 where flash-attn is installed, else sdpa."""
    if attn_implementation != "auto":
        return attn_implementation
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "sdpa"


def check_attn_implementation(attn_implementation: str) -> None:
    """Raise if the attention implementation is unknown or needs a package that is missing.

    ``flash_attn`` is looked up with ``importlib.util.find_spec``, never imported here.

    Parameters
    ----------
    attn_implementation : str
        One of ``ATTN_IMPLEMENTATIONS``.
    """
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown attn_implementation {attn_implementation!r}; use one of "
            f"{', '.join(ATTN_IMPLEMENTATIONS)}."
        )
    if (
        attn_implementation == "flash_attention_2"
        and importlib.util.find_spec("flash_attn") is None
    ):
        raise ValueError(
            "attn_implementation='flash_attention_2' needs the flash-attn package, which is not "
            "installed: install the gpu extra (pip install -e '.[gpu]') or use "
            "attn_implementation='sdpa'."
        )


def finish(model: PreTrainedModel, dtype: torch.dtype | str, device: str) -> PreTrainedModel:
    """Check the family, cast (unless "auto"), move to ``device`` and switch to eval mode."""
    check_supported(model)
    if isinstance(dtype, torch.dtype):
        model = model.to(dtype)
    return model.to(device).eval()
