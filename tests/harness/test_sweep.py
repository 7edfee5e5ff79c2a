"""Sweep mode: one prefill per example gives exactly what one run per cell gives."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from baselines import H2O, Full, PyramidKV, RandomEviction, SnapKV, StreamingLLM
from capkv import Budget, CapKV, evict
from capkv.engine.compression import gathered_cache, record_kept
from capkv.engine.hooks import run_with_cache
from capkv.harness.runner import Cell, run_cell
from capkv.harness.sweep import run_sweep
from capkv.results.store import finished_rows
from capkv.tasks.needle import NeedleTask
from tests.conftest import random_prompt

METHODS = {
    "capkv": CapKV(),
    "snapkv": SnapKV(window=8),
    "pyramidkv": PyramidKV(window=8),
    "h2o": H2O(window=8, chunk=64),
    "streamingllm": StreamingLLM(),
    "random": RandomEviction(),
    "full": Full(),
    "snapkv_adaptive": SnapKV(window=8, allocation="adaptive"),
    "capkv_model": CapKV(allocation="model"),
}
BUDGETS = [Budget(tokens=48), Budget(ratio=0.5)]


def cells_of(methods):
    return [
        (name, method, budget if method.evicts else None)
        for name, method in methods.items()
        for budget in (BUDGETS if method.evicts else [None])
    ]


def test_one_prefill_records_the_indices_each_separate_prefill_keeps(gqa_model):
    model, _ = gqa_model
    input_ids = random_prompt(model.config.vocab_size, 300, seed=11)
    cells = cells_of(METHODS)
    full_cache = DynamicCache()
    with torch.no_grad(), record_kept(model, [(m, b) for _, m, b in cells]) as records:
        run_with_cache(model, input_ids, full_cache)
    for (name, method, budget), record in zip(cells, records, strict=True):
        cache = DynamicCache()
        with torch.no_grad(), evict(model, method, budget=budget) as separate:
            run_with_cache(model, input_ids, cache)
        assert separate.kept.keys() == record.kept.keys(), name
        for layer_idx, indices in separate.kept.items():
            assert torch.equal(indices, record.kept[layer_idx]), (name, budget, layer_idx)
        gathered = gathered_cache(full_cache, record)
        for layer_idx in range(record.num_layers):
            assert torch.equal(gathered.layers[layer_idx].keys, cache.layers[layer_idx].keys)
            assert torch.equal(gathered.layers[layer_idx].values, cache.layers[layer_idx].values)


@pytest.mark.parametrize("protocol", ["query_aware", "context_only"])
def test_sweep_rows_equal_separate_runs(protocol, tmp_path, gqa_model):
    model, tokenizer = gqa_model
    task = NeedleTask(context_lengths=[250, 500], depths=[0, 100])
    cells = cells_of(METHODS)

    def identity(name, budget):
        label = budget.label if budget is not None else "full"
        return {
            "model": "tiny",
            "task": "needle",
            "method": name,
            "budget": label,
            "protocol": protocol,
        }

    sweep_cells = [
        Cell(method, budget, tmp_path / "sweep" / f"{name}-{i}", identity(name, budget))
        for i, (name, method, budget) in enumerate(cells)
    ]
    sweep_metrics = run_sweep(model, tokenizer, task, sweep_cells, protocol)
    predictions = set()
    for i, (name, method, budget) in enumerate(cells):
        separate_dir = tmp_path / "separate" / f"{name}-{i}"
        separate = Cell(method, budget, separate_dir, identity(name, budget))
        metrics = run_cell(model, tokenizer, task, separate, protocol)
        separate_rows = finished_rows(separate_dir)
        sweep_rows = finished_rows(tmp_path / "sweep" / f"{name}-{i}")
        assert len(sweep_rows) == len(separate_rows) == 4
        for sweep_row, separate_row in zip(sweep_rows, separate_rows, strict=True):
            sweep_row.pop("seconds"), separate_row.pop("seconds")
            assert sweep_row == separate_row, (name, budget)
            predictions.add(separate_row["prediction"])
        assert sweep_metrics[i] == metrics
    assert len(predictions) > 1, "eviction must change some outputs for the test to mean anything"


def test_sweep_resumes_only_the_missing_cells(tmp_path, gqa_model):
    model, tokenizer = gqa_model
    task = NeedleTask(context_lengths=[250], depths=[0, 100])

    def make_cells():
        return [
            Cell(
                m,
                b,
                tmp_path / n,
                {
                    "model": "m",
                    "task": "t",
                    "method": n,
                    "budget": "b",
                    "protocol": "query_aware",
                },
            )
            for n, m, b in [
                ("snap", SnapKV(window=8), Budget(tokens=64)),
                ("cap", CapKV(), Budget(tokens=64)),
            ]
        ]

    run_sweep(model, tokenizer, task, make_cells()[:1], "query_aware")
    before = finished_rows(tmp_path / "snap")
    run_sweep(model, tokenizer, task, make_cells(), "query_aware")
    assert finished_rows(tmp_path / "snap") == before
    assert len(finished_rows(tmp_path / "cap")) == 2
