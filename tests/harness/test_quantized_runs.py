"""Quantized caches through the harness: sweep rows equal separate runs' rows, every method
(and a kvpress press where kvpress is installed) answers from a quantized cache with its bytes
recorded, and cache.quantization=none leaves rows and folders as they were."""

from __future__ import annotations

import pytest

from baselines import H2O, Full, PyramidKV, SnapKV, StreamingLLM
from capkv import Budget, CapKV
from capkv.engine.kv_bytes import formula_bytes
from capkv.engine.quantization import CacheQuantization
from capkv.harness.runner import Cell, run_cell
from capkv.harness.sweep import run_sweep
from capkv.interop import kvpress_problem
from capkv.results.store import CONFIG, finished_rows, run_directory
from capkv.tasks.needle import NeedleTask
from tests.harness.test_run import TINY_NEEDLE, run

METHODS = {
    "capkv": CapKV(),
    "capkv_adaptive": CapKV(allocation="adaptive"),
    "capkv_model": CapKV(allocation="model"),
    "snapkv": SnapKV(window=8),
    "pyramidkv": PyramidKV(window=8),
    "h2o": H2O(window=8, chunk=64),
    "streamingllm": StreamingLLM(),
    "full": Full(),
}
if kvpress_problem() is None:
    from capkv.interop import KvpressMethod

    METHODS["kvpress-knorm"] = KvpressMethod(press="knorm")
SETTINGS = [CacheQuantization("fp8", axis_key=-1), CacheQuantization("quanto", q_group_size=16)]


def installed(settings: CacheQuantization) -> bool:
    try:
        settings.check()
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: s.label)
def test_quantized_sweep_rows_equal_separate_runs(settings, tmp_path, gqa_model):
    if not installed(settings):
        pytest.skip(f"{settings.quantization} is not installed")
    model, tokenizer = gqa_model
    task = NeedleTask(context_lengths=[250], depths=[0, 100])
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    cells = [
        (name, method, None if not method.evicts else Budget(tokens=48))
        for name, method in METHODS.items()
    ]

    def cell(folder, name, method, budget):
        identity = {"model": "tiny", "task": "needle", "method": name, "budget": str(budget)}
        return Cell(method, budget, tmp_path / folder / name, identity, quantization=settings)

    run_sweep(model, tokenizer, task, [cell("sweep", *c) for c in cells], "query_aware")
    for name, method, budget in cells:
        run_cell(model, tokenizer, task, cell("separate", name, method, budget), "query_aware")
        swept = finished_rows(tmp_path / "sweep" / name)
        separate = finished_rows(tmp_path / "separate" / name)
        assert len(swept) == len(separate) == 2
        for a, b in zip(swept, separate, strict=True):
            a.pop("seconds"), b.pop("seconds")
            assert a == b, name
            assert a["kv_bytes"] == formula_bytes(
                a["padded_tokens_per_layer"], config.num_key_value_heads, head_dim, settings, 4
            )
            assert a["kv_bytes_per_head_layer"] == round(
                a["kv_bytes"] / (config.num_hidden_layers * config.num_key_value_heads), 2
            )


def test_run_py_with_none_writes_what_it_wrote_before_and_quantized_runs_apart(tmp_path):
    cell = ("tiny-random", "needle", "snapkv", "budget64", "query_aware")
    before, explicit = tmp_path / "before", tmp_path / "none"
    before.mkdir(), explicit.mkdir()
    run(before, *TINY_NEEDLE, "method=snapkv", "budget=64")
    run(explicit, *TINY_NEEDLE, "method=snapkv", "budget=64", "cache.quantization=none")
    folders = [run_directory(root / "results", *cell) for root in (before, explicit)]
    config_texts = [(folder / CONFIG).read_text() for folder in folders]
    assert config_texts[0] == config_texts[1]
    assert "cache" not in config_texts[0]
    rows = [finished_rows(folder) for folder in folders]
    for a, b in zip(*rows, strict=True):
        a.pop("seconds"), b.pop("seconds")
        assert a == b
        assert "kv_bytes" not in a
    quantized = [*TINY_NEEDLE, "method=snapkv", "budget=64", "cache.quantization=fp8"]
    run(explicit, *quantized)
    folder = run_directory(
        explicit / "results", "tiny-random", "needle", "snapkv-q8-fp8", "budget64", "query_aware"
    )
    stored = finished_rows(folder)
    assert len(stored) == 4 and all(row["kv_bytes"] > 0 for row in stored)
    assert "quantization: fp8" in (folder / CONFIG).read_text()
    other = run(explicit, *quantized, "cache.axis_key=-1", check=False)
    assert other.returncode == 1
    assert "differs in cache" in other.stderr.strip().splitlines()[-1]
