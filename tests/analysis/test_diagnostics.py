"""Capacity fraction and attention error recorded beside the scores in sweep mode."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from baselines import Full, StreamingLLM
from capkv import Budget, CapKV
from capkv.analysis.diagnostics import CapacityProbe, attention_errors, decoding_queries
from capkv.engine.compression import record_kept
from capkv.engine.hooks import run_with_cache
from capkv.harness.runner import Cell
from capkv.harness.sweep import run_sweep
from capkv.results.store import finished_rows
from capkv.tasks.needle import NeedleTask
from tests.conftest import random_prompt

PROMPT = 240


def probe_and_errors(model, selections, input_ids):
    cache = DynamicCache()
    probe = CapacityProbe(len(selections))
    with torch.no_grad(), record_kept(model, selections, probe.on_layer) as records:
        logits = run_with_cache(model, input_ids, cache).logits[0, -1]
    queries = decoding_queries(model, cache, logits.argmax().view(1, 1), PROMPT)
    assert cache.get_seq_length() == PROMPT, "the probe leaves the full cache as it was"
    return probe, attention_errors(model, cache, queries, records), queries, cache, records


def test_full_cache_keeps_all_capacity_and_has_no_error(gqa_model):
    model, _ = gqa_model
    input_ids = random_prompt(model.config.vocab_size, PROMPT)
    selections = [(Full(), None), (CapKV(), Budget(tokens=PROMPT)), (CapKV(), Budget(tokens=40))]
    probe, errors, *_ = probe_and_errors(model, selections, input_ids)
    assert probe.mean(0) == probe.mean(1) == 1.0 and errors[0] == errors[1] == 0.0
    assert 0.0 < probe.mean(2) < 1.0 and errors[2] > 0.0


def test_capkv_keeps_more_capacity_than_a_recency_window(gqa_model):
    model, _ = gqa_model
    input_ids = random_prompt(model.config.vocab_size, PROMPT, seed=4)
    selections = [(CapKV(), Budget(tokens=48)), (StreamingLLM(), Budget(tokens=48))]
    probe, *_ = probe_and_errors(model, selections, input_ids)
    assert probe.mean(0) > probe.mean(1)


def test_attention_error_matches_a_naive_computation(gqa_model):
    model, _ = gqa_model
    input_ids = random_prompt(model.config.vocab_size, PROMPT, seed=5)
    probe, errors, queries, cache, records = probe_and_errors(
        model, [(StreamingLLM(), Budget(tokens=64))], input_ids
    )
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    per_layer = []
    for layer_idx, module in enumerate(model.model.layers):
        keys = cache.layers[layer_idx].keys[0].repeat_interleave(group, dim=0)  # (H, T, d)
        values = cache.layers[layer_idx].values[0].repeat_interleave(group, dim=0)
        query = queries[layer_idx][0]  # (H, 1, d)
        scaling = module.self_attn.scaling
        full = torch.softmax(query @ keys.transpose(1, 2) * scaling, -1) @ values
        kept = torch.cat([torch.arange(4), torch.arange(PROMPT - 60, PROMPT)])
        part = torch.softmax(query @ keys[:, kept].transpose(1, 2) * scaling, -1) @ values[:, kept]
        per_layer.append(float((part - full).norm() / full.norm()))
    assert abs(errors[0] - sum(per_layer) / len(per_layer)) < 1e-5


def test_sweep_rows_carry_diagnostics_and_metrics_average_them(tmp_path, gqa_model):
    model, tokenizer = gqa_model
    task = NeedleTask(context_lengths=[250], depths=[0, 100])
    identity = {"model": "m", "task": "t", "method": "c", "budget": "b", "protocol": "query_aware"}
    cells = [Cell(CapKV(), Budget(tokens=64), tmp_path / "c", identity)]
    (metrics,) = run_sweep(model, tokenizer, task, cells, "query_aware", diagnostics=True)
    rows = finished_rows(tmp_path / "c")
    assert all(set(row["diagnostics"]) == {"capacity_fraction", "attention_error"} for row in rows)
    mean = sum(row["diagnostics"]["capacity_fraction"] for row in rows) / 2
    assert abs(metrics["diagnostics"]["capacity_fraction"] - mean) < 1e-12
