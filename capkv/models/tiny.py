"""The tiny random model of the tests: 4 layers of any supported family, built from a config with
a byte-level tokenizer and a ChatML template, so nothing is downloaded."""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from capkv.models.support import check_attn_implementation, check_supported, finish

TINY_NAME = "tiny-random"
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
    return finish(model, torch.float32, "cpu"), tokenizer
