"""Shared fixtures: tiny randomly initialised models and a helper to capture prefill states."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from capkv.decoding import attention_layers
from capkv.engine import prefill_state
from capkv.layer import LayerPrefill
from capkv.models import build_tiny_model


@pytest.fixture(scope="session")
def gqa_model():
    """Tiny Llama with 4 query heads sharing 2 KV heads (GQA), sdpa attention."""
    return build_tiny_model(seed=0, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="session")
def mha_model():
    """Tiny Llama with plain multi-head attention (4 query and 4 KV heads)."""
    return build_tiny_model(seed=1, num_attention_heads=4, num_key_value_heads=4)


def random_prompt(vocab_size: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (1, length), generator=generator)


@torch.no_grad()
def capture_prefill(model, input_ids: torch.Tensor) -> list[LayerPrefill]:
    """Run a plain prefill and return every layer's prefill state (nothing is evicted)."""
    layers = attention_layers(model)
    states: list[LayerPrefill] = []

    def keep_state(module, args, kwargs, output):
        states.append(prefill_state(module, kwargs, model.model.rotary_emb, len(layers)))
        return output

    handles = [m.register_forward_hook(keep_state, with_kwargs=True) for m in layers]
    try:
        model(input_ids, past_key_values=DynamicCache())
    finally:
        for handle in handles:
            handle.remove()
    return states
