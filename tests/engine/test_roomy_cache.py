"""Decoding into reserved room (RoomyLayer) gives bit for bit the logits of concatenating."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from baselines import Full, PyramidKV, SnapKV
from capkv import Budget, CapKV, evict
from capkv.engine import decoding
from capkv.engine.decoding import RoomyLayer, greedy_generate, per_layer_masks, reserve_room
from capkv.engine.hooks import run_with_cache
from capkv.models import build_tiny_model
from tests.conftest import random_prompt

PROMPT = 160
STEPS = 12
METHODS = [
    (Full(), None),
    (SnapKV(window=8), Budget(tokens=48)),
    (PyramidKV(window=8), Budget(tokens=48)),  # layers of different lengths
    (CapKV(allocation="adaptive"), Budget(tokens=48)),  # per-head masked (ragged) layers
]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    model, _ = build_tiny_model(seed=3, attn_implementation=request.param)
    return model


def compressed(model, method, budget, input_ids) -> tuple[DynamicCache, torch.Tensor]:
    """A prefilled cache of ``input_ids`` under ``method`` and the logits of its last position."""
    cache = DynamicCache()
    with torch.inference_mode(), evict(model, method, budget=budget):
        logits = run_with_cache(model, input_ids, cache, logits_to_keep=1).logits[0, -1]
    return cache, logits


def step_logits(model, cache, start: int, feeds: list[torch.Tensor]) -> list[torch.Tensor]:
    """The logits after each of ``feeds``, fed one after the other into ``cache``."""
    out = []
    position = start
    with torch.inference_mode(), per_layer_masks(model):
        for tokens in feeds:
            positions = torch.arange(position, position + tokens.shape[1]).unsqueeze(0)
            out.append(
                run_with_cache(
                    model, tokens, cache, position_ids=positions, use_cache=True, logits_to_keep=1
                ).logits[0, -1]
            )
            position += tokens.shape[1]
    return out


@pytest.mark.parametrize(("method", "budget"), METHODS)
def test_logits_equal_concatenating_ones_bit_for_bit(model, method, budget):
    input_ids = random_prompt(model.config.vocab_size, PROMPT, seed=5)
    feeds = [random_prompt(model.config.vocab_size, 3, seed=6)]  # a question, then tokens
    feeds += [random_prompt(model.config.vocab_size, 1, seed=7 + i) for i in range(STEPS)]
    plain, _ = compressed(model, method, budget, input_ids)
    roomy, _ = compressed(model, method, budget, input_ids)
    reserve_room(roomy, STEPS)  # fewer than fed: the last steps append by concatenating
    assert all(isinstance(layer, RoomyLayer) for layer in roomy.layers)
    expected = step_logits(model, plain, PROMPT, feeds)
    got = step_logits(model, roomy, PROMPT, feeds)
    for step, (a, b) in enumerate(zip(expected, got, strict=True)):
        assert torch.equal(a, b), step
    for a, b in zip(plain.layers, roomy.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize(("method", "budget"), METHODS)
def test_greedy_tokens_equal_without_reserved_room(model, method, budget):
    input_ids = random_prompt(model.config.vocab_size, PROMPT, seed=8)
    cache, logits = compressed(model, method, budget, input_ids)
    got = greedy_generate(model, cache, PROMPT, STEPS, next_token_logits=logits)
    cache, logits = compressed(model, method, budget, input_ids)
    with mock.patch.object(decoding, "reserve_room", lambda cache, tokens: None):
        expected = greedy_generate(model, cache, PROMPT, STEPS, next_token_logits=logits)
    assert got == expected


def test_replaced_states_append_by_concatenating():
    layer = DynamicLayer()
    layer.update(torch.ones(1, 2, 4, 8), torch.ones(1, 2, 4, 8))
    cache = DynamicCache()
    cache.layers = [layer]
    reserve_room(cache, 8)
    layer.update(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))
    assert layer.keys.data_ptr() == layer.key_buffer.data_ptr()  # written in place
    layer.keys, layer.values = layer.keys[..., :2, :].clone(), layer.values[..., :2, :].clone()
    keys, values = layer.update(torch.full((1, 2, 1, 8), 2.0), torch.full((1, 2, 1, 8), 2.0))
    assert keys.shape[-2] == values.shape[-2] == 3  # an eviction's states, then the new token
    assert keys.data_ptr() != layer.key_buffer.data_ptr()
    assert torch.equal(keys[..., 2, :], torch.full((1, 2, 8), 2.0))


def test_room_is_reserved_again_when_too_little_is_left():
    layer = DynamicLayer()
    layer.update(torch.ones(1, 2, 4, 8), torch.ones(1, 2, 4, 8))
    cache = DynamicCache()
    cache.layers = [layer]
    reserve_room(cache, 1)
    first = layer.key_buffer
    reserve_room(cache, 1)  # room enough: the same buffers
    assert layer.key_buffer is first
    reserve_room(cache, 3)
    assert layer.key_buffer.shape[-2] == 4 + 3
    assert torch.equal(layer.keys, torch.ones(1, 2, 4, 8))
    layer.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))
    assert layer.keys.data_ptr() == layer.key_buffer.data_ptr()
