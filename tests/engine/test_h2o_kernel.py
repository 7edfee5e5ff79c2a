"""The fused H2O kernel, run on the CPU by Triton's interpreter, against the chunked path.

``TRITON_INTERPRET=1`` must be set before Triton is first imported (tests/conftest.py sets
it); the interpreter is slow, so the inputs are small, with lengths that are not a
multiple of the 16-token tiles used here.
"""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch

from capkv.engine import attention
from capkv.engine.attention import accumulated_attention
from capkv.models import build_tiny_model
from tests.conftest import capture_prefill, random_prompt

TILES = {"block_m": 16, "block_n": 16}


@pytest.fixture
def kernel():
    """The kernel; skipped without Triton, except where CAPKV_REQUIRE_TRITON=1 (make test)."""
    if os.environ.get("CAPKV_REQUIRE_TRITON") == "1":
        import triton  # noqa: F401  (fails the test where CI lost the extra)
    pytest.importorskip("triton", reason="the 'triton' extra is not installed")
    from capkv.engine.h2o_kernel import fused_received_attention

    return fused_received_attention


def chunked_reference(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Per key, causal softmax probabilities summed over queries and query heads, in float64."""
    group = queries.shape[1] // keys.shape[1]
    keys = keys.double().repeat_interleave(group, dim=1)
    logits = queries.double() @ keys.transpose(-1, -2) * scaling
    length = queries.shape[2]
    future = torch.ones(length, length, dtype=torch.bool).triu_(1)
    probabilities = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
    received = probabilities.sum(dim=2)  # (B, H, T)
    return received.view(keys.shape[0], -1, group, length).sum(dim=2)


@pytest.mark.parametrize(
    ("bsz", "heads", "kv_heads", "length", "head_dim"),
    [(1, 4, 2, 37, 16), (2, 3, 3, 50, 24), (1, 6, 1, 16, 32), (1, 2, 2, 1, 16)],
    ids=["gqa", "mha-batch2-d24", "mqa-one-tile", "one-token"],
)
def test_kernel_equals_the_attention_matrix_on_random_inputs(
    kernel, bsz, heads, kv_heads, length, head_dim
):
    generator = torch.Generator().manual_seed(length)
    queries = torch.randn(bsz, heads, length, head_dim, generator=generator) * 2
    keys = torch.randn(bsz, kv_heads, length, head_dim, generator=generator)
    scaling = head_dim**-0.5
    fused = kernel(queries, keys, scaling, **TILES)
    expected = chunked_reference(queries, keys, scaling)
    torch.testing.assert_close(fused.double(), expected, rtol=1e-5, atol=1e-5)
    # Every query distributes exactly one unit of attention per head.
    per_head = torch.full((bsz, kv_heads), float(heads // kv_heads * length))
    torch.testing.assert_close(fused.sum(dim=-1), per_head, rtol=1e-5, atol=1e-4)


def test_kernel_in_bfloat16_equals_the_attention_matrix_of_the_rounded_inputs(kernel):
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(1, 4, 40, 16, generator=generator).bfloat16()
    keys = torch.randn(1, 2, 40, 16, generator=generator).bfloat16()
    fused = kernel(queries, keys, 0.25, **TILES)
    expected = chunked_reference(queries, keys, 0.25)
    torch.testing.assert_close(fused.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_kernel_equals_the_chunked_h2o_scores_of_the_tiny_model(kernel, kv_heads):
    """Ragged: 45 tokens (neither a multiple of the tiles nor of the chunk of 8 queries)."""
    model, _ = build_tiny_model(seed=0, num_key_value_heads=kv_heads)
    states = capture_prefill(model, random_prompt(model.config.vocab_size, 45))
    for state in states:
        chunked = accumulated_attention(state, chunk=8, fused=False)
        queries = state.queries(0).to(state.keys.dtype)
        fused = kernel(queries, state.keys, state.module.scaling, **TILES)
        torch.testing.assert_close(fused / state.group_size, chunked, rtol=1e-5, atol=1e-5)


def test_without_triton_the_chunked_path_runs_after_one_warning(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "capkv.engine.h2o_kernel", None)  # makes the import fail
    attention._fused_kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="capkv.engine.attention"):
            assert attention._fused_kernel() is None
            assert attention._fused_kernel() is None
        assert len(caplog.records) == 1
        assert "fall back to the chunked PyTorch path" in caplog.records[0].getMessage()
        model, _ = build_tiny_model(seed=0)
        (state, *_) = capture_prefill(model, random_prompt(model.config.vocab_size, 20))
        with pytest.raises(ImportError, match="needs Triton"):
            accumulated_attention(state, fused=True)
    finally:
        attention._fused_kernel.cache_clear()
