"""Bytes as a budget: ``kv_bytes=`` buys the most tokens that fit, measured from the cache's
tensors; ``kv_fraction=`` keeps the share of the prompt a fraction of its 16-bit cache holds;
``caches=[...]`` sweeps storages, each cell with its own folder and the bytes it held, and a
sweep's rows equal a single run's."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from transformers import DynamicCache

from capkv.engine.kv_bytes import KVShape, held_bytes, kept_share, tokens_within
from capkv.engine.quantization import CacheQuantization, named_storage, quantized_cache
from capkv.models import ModelConfig
from capkv.results.store import finished_rows, run_directory
from tests.harness.test_run import run

TINY = KVShape(*[4, 2, 16, 4])  # tiny-random: 4 layers, 2 KV heads of width 16, float32
STORAGES = ["none", "bf16", "fp16", "fp8", "hqq8", "hqq4", "hqq2", "quanto4", "quanto2"]


def storage(name: str, **settings) -> CacheQuantization:
    chosen = named_storage(name, CacheQuantization(q_group_size=16, **settings))
    try:
        chosen.check()
    except ValueError as error:
        pytest.skip(str(error))
    return chosen


def held_per_head_layer(tokens: int, settings: CacheQuantization) -> Fraction:
    """Bytes per KV head and layer of a random cache of ``tokens`` per head, stored."""
    cache = DynamicCache()
    for layer in range(TINY.num_layers):
        states = torch.randn(2, 1, TINY.num_kv_heads, tokens, TINY.head_dim).unbind(0)
        cache.update(*states, layer)
    held = quantized_cache(cache, settings) if settings.active else cache
    return Fraction(held_bytes(held), TINY.num_layers * TINY.num_kv_heads)


def test_the_tiny_shape_is_read_from_the_model_config_without_weights():
    assert KVShape.of(*ModelConfig(name="tiny-random").architecture()) == TINY
    smollm2 = KVShape.of(*ModelConfig(name="smollm2-135m", dtype="float32").architecture())
    assert smollm2 == KVShape(30, 3, 64, 4)


@pytest.mark.parametrize("name", STORAGES)
@pytest.mark.parametrize("kv_bytes", [400, 1000, 4096])
def test_kv_bytes_buys_the_most_tokens_whose_measured_bytes_fit(name, kv_bytes):
    settings = storage(name)
    tokens = tokens_within(kv_bytes, TINY, settings)
    assert tokens >= 1
    assert held_per_head_layer(tokens, settings) <= kv_bytes
    assert held_per_head_layer(tokens + 1, settings) > kv_bytes


@pytest.mark.parametrize(
    ("name", "share"),
    [("none", Fraction(1, 8)), ("bf16", Fraction(1, 4)), ("hqq8", Fraction(1, 3)), ("hqq4", 0.5)],
)
def test_kv_fraction_keeps_the_share_its_bytes_hold(name, share):
    # A quarter of the 16-bit cache (64 bytes a token per head and layer): float32 holds an
    # eighth of the tokens, bfloat16 a quarter; hqq's 8 bits cost 16 bytes of values and 2
    # float32 metadata per group of 16 (48 a token), its 4 bits 8 + 8 (32 a token).
    assert kept_share(0.25, TINY, storage(name)) == share


def test_a_byte_sweep_over_storages_records_what_each_cell_held(tmp_path):
    needle = ["model=tiny-random", "task.context_lengths=[300]", "task.depths=[0,100]"]
    sweep = ["methods=[snapkv,full]", "caches=[none,bf16,hqq4]", "kv_fractions=[0.5,0.25]"]
    run(tmp_path, *needle, *sweep, "cache.q_group_size=16")
    results = tmp_path / "results"
    for cache in ["none", "bf16", "hqq4"]:
        suffix = "" if cache == "none" else f"-{named_storage(cache, CacheQuantization()).label}"
        for fraction in (0.5, 0.25):
            rows = finished_rows(
                run_directory(results, "tiny-random", "needle", f"snapkv{suffix}",
                              f"kvfrac{fraction:g}", "query_aware")
            )  # fmt: skip
            assert len(rows) == 2
            for row in rows:
                assert 0 < row["kv_fraction_held"] <= fraction
                reference = TINY.num_layers * TINY.num_kv_heads * (64 * row["prompt_tokens"])
                assert row["kv_fraction_held"] == round(row["kv_bytes"] / reference, 6)
        full = finished_rows(
            run_directory(results, "tiny-random", "needle", f"full{suffix}", "full", "query_aware")
        )
        held = {"none": 2.0, "bf16": 1.0, "hqq4": 0.5}[cache]  # float32, 16 bits, 4 + metadata
        assert [row["kv_fraction_held"] for row in full] == pytest.approx([held, held], abs=1e-3)
    single = tmp_path / "single"
    single.mkdir()
    alone = ["method=snapkv", "cache.quantization=hqq", "cache.nbits=4"]
    run(single, *needle, *alone, "cache.q_group_size=16", "kv_fraction=0.25")
    cell = ("tiny-random", "needle", "snapkv-q4-hqq", "kvfrac0.25", "query_aware")
    swept = finished_rows(run_directory(results, *cell))
    separate = finished_rows(run_directory(single / "results", *cell))
    for a, b in zip(swept, separate, strict=True):
        a.pop("seconds"), b.pop("seconds")
        assert a == b


def test_a_shared_context_under_a_byte_budget_records_its_bytes(tmp_path):
    needle = ["model=tiny-random", "task.context_lengths=[300]", "task.depths=[0]"]
    shared = ["protocol=shared_context", "task.num_needles=2", "method=snapkv"]
    run(tmp_path, *needle, *shared, "cache.quantization=none", "kv_fraction=0.5")
    cell = ("tiny-random", "needle", "snapkv", "kvfrac0.5", "shared_context")
    rows = finished_rows(run_directory(tmp_path / "results", *cell))
    assert [row["turn"] for row in rows] == [1, 2]
    assert all(0 < row["kv_fraction_held"] <= 0.5 for row in rows)
