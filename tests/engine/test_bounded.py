"""Greedy generation of a fixed length under a bound, and the streaming benchmark's measurement
of it, on the tiny model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from baselines import Full, StreamingLLM
from capkv import Budget, CapKV
from capkv.analysis.continuations import first_divergence, rouge_l
from capkv.engine.bounded import generate_bounded
from capkv.engine.streaming import StreamSettings
from capkv.models import build_tiny_model

ROOT = Path(__file__).resolve().parents[2]


def script(name: str):
    """A module of scripts/ (not a package), imported from its file."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(seed=0)


def prompt(model, length: int = 100) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, model.config.vocab_size, (1, length), generator=generator)


@pytest.mark.parametrize("compress_every", [None, 4])
@pytest.mark.parametrize("method", [CapKV(), StreamingLLM()], ids=["capkv", "streamingllm"])
def test_a_bound_as_long_as_the_text_continues_exactly_as_the_full_cache(
    tiny, method, compress_every
):
    model, _ = tiny
    ids = prompt(model)
    settings = StreamSettings(chunk=24, compress_every=compress_every)
    full = generate_bounded(model, ids, Full(), None, settings, 6)
    assert len(full.tokens) == 6  # exactly new_tokens: no stop token
    text = Budget(tokens=ids.shape[1] + 6)
    bounded = generate_bounded(model, ids, method, text, settings, 6)
    assert bounded.final_per_layer == full.final_per_layer
    assert first_divergence(full.tokens, bounded.tokens) == 6
    assert rouge_l(full.tokens, bounded.tokens) == 1.0


def test_a_bounded_generation_holds_at_most_budget_plus_chunk_tokens(tiny):
    model, _ = tiny
    settings = StreamSettings(chunk=24, compress_every=4)
    bounded = generate_bounded(model, prompt(model), CapKV(), Budget(tokens=16), settings, 6)
    assert max(bounded.record.peak_per_layer) == 16 + 24  # budget + max(chunk, K)
    assert max(bounded.prefill_peak_per_layer) <= 16 + 24
    assert min(bounded.prefill_seconds, bounded.decode_seconds) > 0


def test_generation_past_the_models_positions_is_refused(tiny):
    model, _ = tiny
    ids = torch.ones(1, 4090, dtype=torch.long)
    with pytest.raises(ValueError, match="position limit of 4096"):
        generate_bounded(model, ids, CapKV(), Budget(tokens=64), StreamSettings(chunk=512), 8)


def test_the_benchmark_measures_the_peak_cache_in_bytes_against_the_full_cache(tiny):
    bench = script("bench_streaming")
    model, _ = tiny
    ids = prompt(model)
    per_token = bench.bytes_per_token(model)
    assert per_token == 2 * 16 * 2 * 4  # KV heads x head_dim x (keys, values) x float32
    layers = model.config.num_hidden_layers
    full = bench.measure(model, ids, Full(), None, StreamSettings(), 5)
    assert full["generated"] == 5
    assert full["prefill_peak_bytes"] == 100 * layers * per_token
    assert full["peak_bytes"] == (100 + 4) * layers * per_token  # the last token is not fed back
    settings = StreamSettings(chunk=24, compress_every=4)
    bounded = bench.measure(model, ids, CapKV(), 16, settings, 5)
    assert bounded["peak_tokens"] == 16 + 24
    assert bounded["peak_bytes"] == (16 + 24) * layers * per_token
    assert bounded["peak_bytes"] / full["prefill_peak_bytes"] <= (16 + 24) / 100
    assert min(bounded["prefill_seconds"], bounded["decode_wall_seconds"]) > 0
