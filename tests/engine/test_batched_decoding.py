"""Batched decoding of a sweep's cells: the same greedy tokens, rows, metrics and resume.

A batch reduces floating-point sums in another order than batch 1, so where the two best logits
of a step are within rounding of each other, the greedy choice may flip. The comparison below
detects such a flip: at the first step where a cell's batched tokens differ from its one-by-one
tokens, it recomputes the one-by-one logits of that step and accepts the difference only if
their top two are within ``NEAR_TIE`` (float32 rounding of a batch is about 1e-6 here), and
compares that cell no further. Every other token must be equal; on the tiny model none flips.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from baselines import H2O, Full, PyramidKV, SnapKV, StreamingLLM
from capkv import Budget, CapKV
from capkv.engine.compression import gathered_cache, record_kept
from capkv.engine.decoding import (
    batched_greedy_generate,
    check_batchable,
    greedy_generate,
    per_layer_masks,
)
from capkv.engine.hooks import run_with_cache
from capkv.harness.runner import Cell
from capkv.harness.sweep import decoding_groups, run_sweep
from capkv.models import build_tiny_model
from capkv.results.store import finished_rows
from capkv.tasks.needle import NeedleTask
from tests.conftest import random_prompt

NEAR_TIE = 1e-4
CELLS = [
    (CapKV(), Budget(tokens=40)),
    (CapKV(), Budget(ratio=0.5)),
    (SnapKV(window=8), Budget(tokens=40)),
    (PyramidKV(window=8), Budget(tokens=40)),  # different lengths per layer
    (H2O(window=8, chunk=64), Budget(ratio=0.75)),
    (StreamingLLM(), Budget(tokens=24)),
    (Full(), None),
]


def one_by_one_logits(model, cache, start: int, feeds: list[torch.Tensor]) -> torch.Tensor:
    """Logits after feeding ``feeds`` one tensor at a time into ``cache`` (the one-by-one path)."""
    position = start
    with torch.inference_mode(), per_layer_masks(model):
        for tokens in feeds:
            positions = torch.arange(position, position + tokens.shape[1]).unsqueeze(0)
            logits = run_with_cache(
                model, tokens, cache, position_ids=positions, use_cache=True, logits_to_keep=1
            ).logits[0, -1]
            position += tokens.shape[1]
    return logits


@pytest.mark.parametrize(
    ("attn_implementation", "protocol"),
    [("sdpa", "query_aware"), ("sdpa", "context_only"), ("eager", "context_only")],
)
def test_batched_greedy_tokens_equal_one_by_one(attn_implementation, protocol):
    model, _ = build_tiny_model(seed=0, attn_implementation=attn_implementation)
    prompt = random_prompt(model.config.vocab_size, 200, seed=3)
    question = random_prompt(model.config.vocab_size, 6, seed=4)
    if protocol == "query_aware":  # the question is in the cache; decoding starts from logits
        prefilled, inputs, fed = torch.cat([prompt, question], dim=1), {}, []
    else:  # the question is fed to the compressed cache
        prefilled, inputs, fed = prompt, {"input_ids": question}, [question]
    full_cache = DynamicCache()
    with torch.inference_mode(), record_kept(model, CELLS) as records:
        last_logits = run_with_cache(model, prefilled, full_cache, logits_to_keep=1).logits[0, -1]
    if protocol == "query_aware":
        inputs["next_token_logits"] = last_logits
    start = prefilled.shape[1]

    def one_by_one(stops):
        return [
            greedy_generate(model, gathered_cache(full_cache, r), start, 12, stops, **inputs)
            for r in records
        ]

    # A stop token that some cells emit early and others late or never: rows leave the batch.
    unstopped = one_by_one([])
    stops = [next(t for t in unstopped[0][2:] if any(t not in other for other in unstopped))]
    separate = one_by_one(stops)
    caches = [gathered_cache(full_cache, r) for r in records]
    batched = batched_greedy_generate(model, caches, start, 12, stops, **inputs)
    flips = 0
    for record, alone, together in zip(records, separate, batched, strict=True):
        step = next((i for i, (a, b) in enumerate(zip(alone, together)) if a != b), None)  # noqa: B905
        if step is None:
            assert together == alone
            continue
        feeds = fed + [torch.tensor([[token]]) for token in alone[:step]]
        cache = gathered_cache(full_cache, record)
        logits = one_by_one_logits(model, cache, start, feeds) if feeds else last_logits
        best, second = logits.topk(2).values.tolist()
        assert best - second < NEAR_TIE, f"not a near-tie: {alone} != {together} at step {step}"
        flips += 1
    assert flips <= 1
    assert len({len(tokens) for tokens in separate}) > 1, "some cells must stop earlier"
    assert len({tuple(tokens) for tokens in separate}) > 1, "eviction must change some outputs"


def test_padding_groups_keep_the_full_cache_apart():
    def record(lengths, ragged=False):
        return SimpleNamespace(kept_per_layer=lambda: lengths, ragged=lambda: ragged)

    records = [record([100, 100]), record([20, 20]), record([24, 16]), record([18, 22])]
    assert decoding_groups(records) == [[0], [1, 2, 3]]
    # A cell whose KV heads keep different counts (head-adaptive) decodes on its own.
    records.append(record([20, 20], ragged=True))
    assert decoding_groups(records) == [[4], [0], [1, 2, 3]]


def sweep_cells(root, cells):
    return [
        Cell(
            method,
            budget,
            root / name,
            {"model": "m", "task": "t", "method": name, "budget": "b", "protocol": "p"},
        )
        for name, (method, budget) in cells.items()
    ]


def test_batched_sweep_writes_the_rows_and_metrics_of_the_one_by_one_sweep(tmp_path, gqa_model):
    model, tokenizer = gqa_model
    task = NeedleTask(context_lengths=[250], depths=[0, 100], max_new_tokens=10)
    cells = {f"cell{i}": CELLS[i] for i in (0, 2, 3, 6)}  # CapKV, SnapKV, PyramidKV, full
    # Head-adaptive: KV heads of a layer keep different counts, so it decodes on its own.
    cells["adaptive"] = (SnapKV(window=8, allocation="adaptive", floor=0.2), Budget(tokens=40))
    alone = run_sweep(model, tokenizer, task, sweep_cells(tmp_path / "alone", cells), "query_aware")
    # Resume: the batched sweep first runs two cells, then all of them.
    first = dict(list(cells.items())[:2])
    run_sweep(
        model,
        tokenizer,
        task,
        sweep_cells(tmp_path / "batch", first),
        "query_aware",
        decode_batch=True,
    )
    before = finished_rows(tmp_path / "batch" / "cell0")
    together = run_sweep(
        model,
        tokenizer,
        task,
        sweep_cells(tmp_path / "batch", cells),
        "query_aware",
        decode_batch=True,
    )
    assert finished_rows(tmp_path / "batch" / "cell0") == before
    for name in cells:
        rows_alone = finished_rows(tmp_path / "alone" / name)
        rows_together = finished_rows(tmp_path / "batch" / name)
        assert len(rows_alone) == len(rows_together) == 2
        for a, b in zip(rows_alone, rows_together, strict=True):
            a.pop("seconds"), b.pop("seconds")
            assert a == b, name
    for a, b in zip(alone, together, strict=True):
        assert {k: v for k, v in a.items() if "second" not in k} == {
            k: v for k, v in b.items() if "second" not in k
        }


def test_batched_decoding_refuses_attention_without_masks():
    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(ValueError, match="decode_batch=false") as error:
        check_batchable(model)
    assert str(error.value).count(". ") == 0  # one sentence
