"""Method scores against independent brute-force computations."""

from __future__ import annotations

import pytest
import torch

from baselines import H2O
from capkv import Budget, CapKV, log_det_capacity
from capkv.models import build_tiny_model
from tests.conftest import capture_prefill, random_prompt

PROMPT = 96


@pytest.mark.parametrize("chunk", [7, 32, 1000])
def test_h2o_equals_the_full_attention_matrix_summed_over_queries(chunk):
    """Naive reference: the model's own eager attention weights (T x T), summed per key."""
    model, _ = build_tiny_model(seed=0, attn_implementation="eager")
    input_ids = random_prompt(model.config.vocab_size, PROMPT)
    with torch.no_grad():
        attentions = model(input_ids, output_attentions=True).attentions
    states = capture_prefill(model, input_ids)
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    for layer_idx, state in enumerate(states):
        naive = attentions[layer_idx][0].sum(dim=1)  # (H, T): attention received per key
        naive = naive.view(model.config.num_key_value_heads, group, PROMPT).mean(dim=1)
        scores = H2O(window=8, chunk=chunk).score(state)[0]
        torch.testing.assert_close(scores, naive, rtol=1e-5, atol=1e-5)


def brute_force_capkv(state, method: CapKV) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 CapKV from the definitions: every query, every future rotation, an explicit inverse.

    Returns the per-query-head weights (H, T'), leverage scores (H, T') and matrices A (H, d, d)
    over the non-sink pool, and the per-KV-head scores (H_kv, T').
    """
    module = state.module
    hidden = state.hidden_states[0].double()
    num_heads, head_dim = state.num_heads, state.head_dim
    weight = module.q_proj.weight.double()
    bias = module.q_proj.bias.double() if module.q_proj.bias is not None else 0.0
    queries = (hidden @ weight.T + bias).view(-1, num_heads, head_dim)[method.n_sink :]
    start = state.prompt_length
    positions = torch.arange(start, start + method.n_future, dtype=torch.float64)
    inv_freq = state.rotary_emb.inv_freq.double()
    angles = torch.cat([positions[:, None] * inv_freq] * 2, dim=-1)  # (n_future, d)
    half = head_dim // 2
    rotated = torch.cat([-queries[..., half:], queries[..., :half]], dim=-1)
    # mean over future positions p and prompt positions t of R_p q_t
    anchor = torch.einsum("pd,thd->hd", angles.cos(), queries) + torch.einsum(
        "pd,thd->hd", angles.sin(), rotated
    )
    anchor = anchor / (method.n_future * queries.shape[0])
    keys = state.keys[0, :, method.n_sink :].double()
    values = state.values[0, :, method.n_sink :].double()
    group = state.group_size
    keys = keys.repeat_interleave(group, dim=0)
    values = values.repeat_interleave(group, dim=0)
    cosine = torch.einsum("hd,htd->ht", anchor, keys)
    cosine = cosine / (anchor.norm(dim=-1, keepdim=True) * keys.norm(dim=-1))
    weights = torch.exp(method.tau * (cosine - cosine.max(dim=-1, keepdim=True).values))
    matrices = torch.eye(head_dim, dtype=torch.float64) + torch.einsum(
        "ht,htd,hte->hde", weights + method.eps, values, values
    )
    inverse = torch.linalg.inv(matrices)
    leverage = torch.einsum("htd,hde,hte->ht", values, inverse, values)
    scores = weights * leverage
    per_kv_head = scores.view(-1, group, scores.shape[-1]).mean(dim=1)
    return weights, scores, matrices, per_kv_head


@pytest.mark.parametrize("heads", [(4, 2), (4, 4)])
def test_capkv_scores_equal_a_float64_brute_force(heads):
    model, _ = build_tiny_model(seed=2, num_attention_heads=heads[0], num_key_value_heads=heads[1])
    input_ids = random_prompt(model.config.vocab_size, PROMPT, seed=1)
    method = CapKV()
    for state in capture_prefill(model, input_ids):
        *_, expected = brute_force_capkv(state, method)
        scores = method.score(state)[0]
        assert torch.all(scores[:, : method.n_sink] == 0)
        torch.testing.assert_close(
            scores[:, method.n_sink :].double(), expected, rtol=1e-4, atol=1e-6
        )


def test_leverage_is_the_log_det_lost_by_removing_one_token():
    """Matrix determinant lemma: logdet(A) - logdet(A - w_i v_i v_i^T) = -log(1 - s_i)."""
    model, _ = build_tiny_model(seed=3)
    input_ids = random_prompt(model.config.vocab_size, PROMPT, seed=2)
    method = CapKV()
    state = capture_prefill(model, input_ids)[1]
    weights, scores, matrices, _ = brute_force_capkv(state, method)
    values = state.values[0, :, method.n_sink :].double().repeat_interleave(state.group_size, 0)
    for head in range(matrices.shape[0]):
        full = torch.linalg.slogdet(matrices[head]).logabsdet
        for token in (0, 10, 50, PROMPT - method.n_sink - 1):
            v = values[head, token]
            removed = matrices[head] - weights[head, token] * torch.outer(v, v)
            lost = full - torch.linalg.slogdet(removed).logabsdet
            torch.testing.assert_close(lost, -torch.log1p(-scores[head, token]))
    # sum_i s_i = d - tr(A^-1) up to the eps part of A
    assert torch.all(scores.sum(-1) < state.head_dim)


def test_log_det_capacity_matches_the_definition_and_grows_with_the_set():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(2, 30, 8, generator=generator, dtype=torch.float64)
    weights = torch.rand(2, 30, generator=generator, dtype=torch.float64)
    kept = torch.tensor([[0, 3, 7, 9], [1, 2, 5, 29]])
    capacity = log_det_capacity(values, weights, kept)
    for head in range(2):
        v = values[head, kept[head]]
        w = weights[head, kept[head]]
        gram = torch.eye(8, dtype=torch.float64) + (v * w[:, None]).T @ v
        torch.testing.assert_close(capacity[head], 0.5 * torch.logdet(gram))
    bigger = torch.cat([kept, torch.tensor([[11], [12]])], dim=-1)
    assert torch.all(log_det_capacity(values, weights, bigger) > capacity)
    assert torch.all(log_det_capacity(values, weights) > log_det_capacity(values, weights, bigger))


def test_capkv_keeps_more_capacity_than_a_recency_window():
    model, _ = build_tiny_model(seed=4)
    input_ids = random_prompt(model.config.vocab_size, 200, seed=3)
    method = CapKV()
    for state in capture_prefill(model, input_ids):
        kept = method.kept_indices(state, Budget(tokens=40))
        recent = torch.cat([torch.arange(4), torch.arange(164, 200)]).expand_as(kept)
        assert torch.all(method.capacity(state, kept) > method.capacity(state, recent))
        assert torch.all(method.capacity(state) > method.capacity(state, kept))
