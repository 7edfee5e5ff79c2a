"""Quantized storage of a compressed cache (capkv.engine.quantization): compression decides the
kept tokens before quantization, the dequantized cache stays within the backend's error of the
unquantized one, decoding reads it, and the bytes measured equal the formula."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from baselines import H2O, PyramidKV, SnapKV, StreamingLLM
from capkv import CapKV
from capkv.engine.budget import Budget
from capkv.engine.compression import evict, gathered_cache, record_kept
from capkv.engine.decoding import HEAD_MASK, greedy_generate
from capkv.engine.hooks import run_with_cache
from capkv.engine.kv_bytes import formula_bytes, held_bytes
from capkv.engine.quantization import CacheQuantization, Fp8Layer, quantized_cache
from tests.conftest import random_prompt

BACKENDS = [
    CacheQuantization("quanto", nbits=4, q_group_size=16),
    CacheQuantization("quanto", nbits=2, q_group_size=16),
    CacheQuantization("hqq", nbits=4, q_group_size=16),
    CacheQuantization("hqq", nbits=8, q_group_size=16),
    CacheQuantization("fp8"),
    CacheQuantization("fp8", axis_key=-1),
]
# Largest error of a dequantized value, relative to the largest magnitude of its tensor: half a
# quantization step of 2**nbits - 1 levels over at most twice the range (asymmetric grouping),
# and fp8 e4m3's relative rounding (2**-4) at the largest values.
BOUND = {2: 1.0 / 3, 4: 1.0 / 15, 8: 1.0 / 255}
FP8_BOUND = 2.0**-4
METHODS = [
    CapKV(),
    CapKV(allocation="adaptive"),
    CapKV(allocation="model"),
    SnapKV(window=8),
    SnapKV(allocation="adaptive", window=8),
    PyramidKV(window=8),
    H2O(),
    StreamingLLM(),
]


@pytest.fixture(scope="module")
def model(gqa_model):
    return gqa_model[0]


def installed(settings: CacheQuantization) -> bool:
    try:
        settings.check()
    except ValueError:
        return False
    return True


def backend_id(settings: CacheQuantization) -> str:
    return f"{settings.label}-k{settings.axis_key}"


def dequantized(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's states as decoding would read them (before any new token)."""
    if isinstance(layer, Fp8Layer):
        return layer.dequantized(layer.key_blocks), layer.dequantized(layer.value_blocks)
    return layer._dequantize(layer._quantized_keys), layer._dequantize(layer._quantized_values)


def compressed(model, method, budget=40, length=120):
    cache = DynamicCache()
    prompt = random_prompt(model.config.vocab_size, length)
    with evict(model, method, budget=budget) as record:
        logits = run_with_cache(model, prompt, cache, logits_to_keep=1).logits[0, -1]
    return cache, record, logits


def bound_of(settings: CacheQuantization) -> float:
    return FP8_BOUND if settings.quantization == "fp8" else BOUND[settings.bits]


@pytest.mark.parametrize("settings", BACKENDS, ids=backend_id)
@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{type(m).__name__}-{m.allocation}")
def test_every_method_keeps_its_tokens_and_the_cache_stays_within_the_backends_bound(
    model, method, settings
):
    if not installed(settings):
        pytest.skip(f"{settings.quantization} is not installed")
    cache, record, _ = compressed(model, method)
    quantized = quantized_cache(cache, settings)
    assert len(quantized.layers) == len(cache.layers)
    for layer, original in zip(quantized.layers, cache.layers, strict=True):
        # Kept tokens (and per-layer lengths, and head masks) are those of the eviction.
        assert layer.get_seq_length() == original.keys.shape[-2]
        mask = getattr(original, HEAD_MASK, None)
        if mask is None:
            assert getattr(layer, HEAD_MASK, None) is None
        else:
            assert torch.equal(getattr(layer, HEAD_MASK), mask)
        assert layer.keys.numel() == 0  # the residual starts empty: all of it is quantized
        for restored, exact in zip(
            dequantized(layer), (original.keys, original.values), strict=True
        ):
            assert restored.shape == exact.shape
            error = (restored - exact).abs().amax()
            assert error <= bound_of(settings) * exact.abs().amax() + 1e-6


@pytest.mark.parametrize("settings", BACKENDS, ids=backend_id)
def test_decoding_reads_the_quantized_cache(model, settings):
    if not installed(settings):
        pytest.skip(f"{settings.quantization} is not installed")
    method = PyramidKV(window=8)
    cache, record, logits = compressed(model, method)
    quantized = quantized_cache(cache, settings)
    tokens = greedy_generate(model, quantized, record.prompt_length, 12, (), None, logits)
    assert len(tokens) == 12
    lengths = [layer.get_seq_length() for layer in quantized.layers]
    assert lengths == [n + 11 for n in record.padded_per_layer()]


def test_the_residual_is_quantized_once_full():
    layer = Fp8Layer(residual_length=4)
    states = torch.randn(1, 2, 10, 8)
    layer.update(states, states)
    for step in range(5):
        keys, _ = layer.update(states[:, :, :1], states[:, :, :1])
        assert keys.shape[-2] == 11 + step
    assert len(layer.key_blocks) == 2  # the prompt, then the first four decoded tokens
    assert layer.keys.shape[-2] == 1


@pytest.mark.parametrize("settings", [CacheQuantization(), *BACKENDS], ids=backend_id)
@pytest.mark.parametrize("method", [CapKV(allocation="adaptive"), PyramidKV(window=8)], ids=str)
def test_bytes_measured_equal_the_formula(model, method, settings):
    if not installed(settings):
        pytest.skip(f"{settings.quantization} is not installed")
    cache, record, _ = compressed(model, method, budget=48)
    held = quantized_cache(cache, settings) if settings.active else cache
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    predicted = formula_bytes(
        record.padded_per_layer(), config.num_key_value_heads, head_dim, settings, 4
    )
    assert held_bytes(held) == predicted
    if settings.active:
        assert held_bytes(held) < held_bytes(cache)


@pytest.mark.parametrize("settings", BACKENDS[:1] + BACKENDS[4:5], ids=backend_id)
def test_a_sweep_cells_cache_equals_its_separate_runs(model, settings):
    if not installed(settings):
        pytest.skip(f"{settings.quantization} is not installed")
    prompt = random_prompt(model.config.vocab_size, 120)
    methods = [SnapKV(window=8), PyramidKV(window=8), CapKV(allocation="adaptive")]
    full = DynamicCache()
    with record_kept(model, [(m, Budget(tokens=40)) for m in methods]) as records:
        run_with_cache(model, prompt, full, logits_to_keep=1)
    for method, record in zip(methods, records, strict=True):
        separate, _, _ = compressed(model, method)
        swept = quantized_cache(gathered_cache(full, record), settings)
        alone = quantized_cache(separate, settings)
        for a, b in zip(swept.layers, alone.layers, strict=True):
            for x, y in zip(dequantized(a), dequantized(b), strict=True):
                torch.testing.assert_close(x, y)


def test_an_unknown_backend_is_refused_in_one_sentence():
    with pytest.raises(ValueError, match="cache.quantization='int3' is not a backend"):
        CacheQuantization("int3").check()
    with pytest.raises(ValueError, match="cache.nbits=3 is not offered"):
        CacheQuantization("quanto", nbits=3).check()


def test_a_backend_not_installed_is_refused_naming_its_extra(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    with pytest.raises(ValueError, match=r"pip install -e '\.\[hqq\]'"):
        CacheQuantization("hqq").check()
