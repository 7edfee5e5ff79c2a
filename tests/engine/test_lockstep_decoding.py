"""Lockstep decoding of a sweep's cells: exactly the tokens of decoding each cell alone."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from baselines import H2O, Full, PyramidKV, SnapKV, StreamingLLM
from capkv import Budget, CapKV
from capkv.engine import decoding
from capkv.engine.compression import gathered_cache, record_kept
from capkv.engine.decoding import (
    greedy_generate,
    lockstep_greedy_generate,
    vocabulary_blocks_forward,
)
from capkv.engine.hooks import run_with_cache
from capkv.models import build_tiny_model
from tests.conftest import random_prompt

CELLS = [
    (CapKV(), Budget(tokens=40)),
    (CapKV(allocation="adaptive"), Budget(tokens=40)),  # per-head masked layers
    (SnapKV(window=8), Budget(ratio=0.5)),
    (PyramidKV(window=8), Budget(tokens=40)),  # different lengths per layer
    (H2O(window=8, chunk=64), Budget(ratio=0.75)),
    (StreamingLLM(), Budget(tokens=24)),
    (Full(), None),
]
NEW_TOKENS = 12


@pytest.mark.parametrize(
    ("attn_implementation", "protocol"),
    [("sdpa", "query_aware"), ("sdpa", "context_only"), ("eager", "query_aware")],
)
def test_lockstep_tokens_equal_each_cell_alone(attn_implementation, protocol, monkeypatch):
    monkeypatch.setattr(decoding, "VOCABULARY_BLOCK", 100)  # the LM head in blocks: 100, 100, 59
    model, _ = build_tiny_model(seed=0, attn_implementation=attn_implementation)
    prompt = random_prompt(model.config.vocab_size, 200, seed=3)
    question = random_prompt(model.config.vocab_size, 6, seed=4)
    prefilled = torch.cat([prompt, question], dim=1) if protocol == "query_aware" else prompt
    full_cache = DynamicCache()
    with torch.inference_mode(), record_kept(model, CELLS) as records:
        last_logits = run_with_cache(model, prefilled, full_cache, logits_to_keep=1).logits[0, -1]
    inputs = (
        {"next_token_logits": last_logits} if protocol == "query_aware" else {"input_ids": question}
    )
    start = prefilled.shape[1]

    def alone(stops):
        return [
            greedy_generate(
                model, gathered_cache(full_cache, r), start, NEW_TOKENS, stops, **inputs
            )
            for r in records
        ]

    # A stop token that some cells emit early and others late or never: cells leave the round.
    unstopped = alone([])
    stops = [next(t for t in unstopped[0][2:] if any(t not in other for other in unstopped))]
    separate = alone(stops)
    caches = [gathered_cache(full_cache, r) for r in records]
    together = lockstep_greedy_generate(model, caches, start, NEW_TOKENS, stops, **inputs)
    assert together == separate
    assert len({len(tokens) for tokens in separate}) > 1, "some cells must stop earlier"
    assert len({tuple(tokens) for tokens in separate}) > 1, "eviction must change some outputs"


def test_lockstep_leaves_the_model_as_it_was(gqa_model):
    model, _ = gqa_model
    prompt = random_prompt(model.config.vocab_size, 50, seed=3)
    caches = []
    for _ in range(2):
        caches.append(DynamicCache())
        with torch.inference_mode():
            logits = run_with_cache(model, prompt, caches[-1], logits_to_keep=1).logits[0, -1]
    lockstep_greedy_generate(model, caches, 50, 3, next_token_logits=logits)
    modules = [*model.model.layers, model.model.norm, model.lm_head]
    assert not any("forward" in module.__dict__ for module in modules)
    assert [cache.get_seq_length() for cache in caches] == [50 + 2, 50 + 2]


class OffsetHead(torch.nn.Linear):
    """An LM head whose own forward is not the plain product: blocks cannot equal it."""

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return super().forward(states) + 1e-3


@pytest.mark.parametrize("head_type", [torch.nn.Linear, OffsetHead])
def test_vocabulary_blocks_equal_the_head_row_by_row(head_type, monkeypatch):
    monkeypatch.setattr(decoding, "VOCABULARY_BLOCK", 100)
    torch.manual_seed(0)
    head = head_type(64, 259, bias=head_type is OffsetHead)
    states = torch.randn(5, 1, 64)
    blocked = vocabulary_blocks_forward(head)
    with torch.inference_mode():
        for _ in range(2):  # the check on the first call, then its verdict
            logits = blocked(states)
            assert all(torch.equal(logits[row], head(states[row : row + 1])[0]) for row in range(5))
