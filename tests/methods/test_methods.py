"""One suite over every method: budgets, protected tokens, short prompts, generation."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from baselines import H2O, Full, PyramidKV, RandomEviction, SnapKV, StreamingLLM, pyramid_schedule
from capkv import Budget, CapKV, evict, greedy_generate
from capkv.engine.allocation import head_floor, kept_mask
from capkv.engine.hooks import attention_layers, run_with_cache
from tests.conftest import random_prompt

BUDGET = 64
PROMPT = 160

METHODS = {
    "capkv": CapKV(),
    "snapkv_max": SnapKV(window=8, kernel=7, pooling="max"),
    "snapkv_avg": SnapKV(window=8, kernel=5, pooling="avg"),
    "pyramidkv": PyramidKV(window=8, beta=20),
    "h2o": H2O(window=8, chunk=48),
    "streamingllm": StreamingLLM(n_sink=4),
    "random": RandomEviction(seed=3),
    # Head-adaptive allocations (the layer's budget over all its KV heads; CapKV's also over
    # every layer, and iteratively).
    "snapkv_adaptive": SnapKV(window=8, kernel=7, allocation="adaptive"),
    "pyramidkv_adaptive": PyramidKV(window=8, beta=20, allocation="adaptive", floor=0.5),
    "h2o_adaptive": H2O(window=8, chunk=48, allocation="adaptive", floor=0.0),
    "capkv_adaptive": CapKV(allocation="adaptive"),
    "capkv_model": CapKV(allocation="model", floor=0.1),
    "capkv_iterative": CapKV(allocation="adaptive", rounds=3),
}


def prefill(model, method, input_ids, **budget):
    cache = DynamicCache()
    with torch.no_grad(), evict(model, method, **budget) as record:
        logits = run_with_cache(model, input_ids, cache).logits[0, -1]
    return cache, record, logits


def record_positions(seen: list):
    """A rotary-embedding hook that records the position ids of every forward."""

    def hook(module, args, kwargs, output):
        position_ids = kwargs["position_ids"] if "position_ids" in kwargs else args[1]
        seen.append(position_ids[0].tolist())

    return hook


def expected_counts(method, num_layers: int, prompt_length: int, budget: int) -> list[int]:
    if isinstance(method, PyramidKV):
        return pyramid_schedule(budget, method.window, method.beta, num_layers, prompt_length)
    return [min(budget, prompt_length)] * num_layers


@pytest.mark.parametrize("model_name", ["gqa_model", "mha_model"])
@pytest.mark.parametrize("name", list(METHODS))
def test_keeps_exactly_its_budget_and_its_protected_tokens(name, model_name, request):
    model, _ = request.getfixturevalue(model_name)
    method = METHODS[name]
    input_ids = random_prompt(model.config.vocab_size, PROMPT)
    cache, record, _ = prefill(model, method, input_ids, budget=BUDGET)
    counts = expected_counts(method, len(attention_layers(model)), PROMPT, BUDGET)
    n_kv = model.config.num_key_value_heads
    per_head = record.kept_per_head()
    if method.model_wide:  # one budget for the whole model, every layer's heads pooled
        assert sum(map(sum, per_head)) == n_kv * sum(counts)
    else:
        assert record.kept_per_layer() == counts
    n_first, n_last = method.protected(PROMPT)
    for layer_idx, count in enumerate(counts):
        layer = cache.layers[layer_idx]
        assert layer.keys.shape[1] == n_kv
        padded = record.kept[layer_idx].shape[-1]
        assert layer.keys.shape[2] == layer.values.shape[2] == padded == max(per_head[layer_idx])
        if method.allocation == "uniform":
            assert per_head[layer_idx] == [count] * n_kv
        else:
            assert min(per_head[layer_idx]) >= head_floor(count, method.floor, n_first + n_last)
        kept = record.kept[layer_idx][0]
        for row, present, n_head in zip(kept, kept_mask(kept), per_head[layer_idx], strict=True):
            assert torch.unique(row[present]).numel() == n_head
            assert bool(present[:n_head].all()) and not bool(present[n_head:].any())
            kept_set = set(row[present].tolist())
            assert set(range(n_first)) <= kept_set
            assert set(range(PROMPT - n_last, PROMPT)) <= kept_set


def test_pyramid_mean_budget_is_the_budget_up_to_the_floor():
    for budget, prompt_length, layers in [(128, 1000, 30), (512, 4000, 32), (64, 160, 4)]:
        counts = pyramid_schedule(budget, 32 if budget > 64 else 8, 20, layers, prompt_length)
        mean = sum(counts) / layers
        assert budget <= mean <= budget + (layers - 1) / 2
        assert counts == sorted(counts, reverse=True)


@pytest.mark.parametrize("name", list(METHODS))
def test_short_prompt_is_left_alone(name, gqa_model):
    model, _ = gqa_model
    input_ids = random_prompt(model.config.vocab_size, BUDGET)
    cache, record, _ = prefill(model, METHODS[name], input_ids, budget=BUDGET)
    assert record.kept == {}
    assert record.kept_per_layer() == [BUDGET] * len(attention_layers(model))
    assert cache.get_seq_length() == BUDGET


@pytest.mark.parametrize("name", list(METHODS))
def test_generation_runs_after_compression(name, gqa_model):
    model, _ = gqa_model
    input_ids = random_prompt(model.config.vocab_size, PROMPT)
    cache, _, logits = prefill(model, METHODS[name], input_ids, budget=BUDGET)
    tokens = greedy_generate(model, cache, PROMPT, 6, next_token_logits=logits)
    assert len(tokens) == 6
    with evict(model, METHODS[name], budget=BUDGET):
        generated = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        )
    assert generated[0, PROMPT:].tolist() == tokens


@pytest.mark.parametrize("name", list(METHODS))
def test_budget_at_least_the_prompt_generates_as_without_eviction(name, gqa_model):
    model, _ = gqa_model
    input_ids = random_prompt(model.config.vocab_size, PROMPT, seed=5)
    reference = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
    )[0, PROMPT:].tolist()
    for budget in (PROMPT, PROMPT + 50):
        cache, record, logits = prefill(model, METHODS[name], input_ids, budget=budget)
        assert record.kept == {}
        assert greedy_generate(model, cache, PROMPT, 8, next_token_logits=logits) == reference
    cache, _, logits = prefill(model, METHODS[name], input_ids, ratio=0.0)
    assert greedy_generate(model, cache, PROMPT, 8, next_token_logits=logits) == reference


def test_full_cache_method_never_evicts(gqa_model):
    model, _ = gqa_model
    input_ids = random_prompt(model.config.vocab_size, PROMPT)
    cache, record, _ = prefill(model, Full(), input_ids, budget=8)
    assert record.kept == {} and cache.get_seq_length() == PROMPT


@pytest.mark.parametrize(
    "name", ["capkv", "snapkv_avg", "pyramidkv", "h2o", "snapkv_adaptive", "capkv_model"]
)
def test_kept_tokens_do_not_depend_on_the_attention_implementation(name):
    from capkv.models import build_tiny_model

    kept = []
    for implementation in ("eager", "sdpa"):
        model, _ = build_tiny_model(seed=0, attn_implementation=implementation)
        input_ids = random_prompt(model.config.vocab_size, PROMPT)
        kept.append(prefill(model, METHODS[name], input_ids, budget=BUDGET)[1].kept)
    for layer_idx in kept[0]:
        assert torch.equal(kept[0][layer_idx], kept[1][layer_idx])


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_every_supported_family(family):
    from capkv.models import build_tiny_model

    model, _ = build_tiny_model(seed=0, model_type=family)
    input_ids = random_prompt(model.config.vocab_size, PROMPT)
    for method in (CapKV(), PyramidKV(window=8), H2O(window=8)):
        cache, record, logits = prefill(model, method, input_ids, budget=BUDGET)
        assert record.kept_per_layer() == expected_counts(
            method, len(attention_layers(model)), PROMPT, BUDGET
        )
        assert len(greedy_generate(model, cache, PROMPT, 4, next_token_logits=logits)) == 4


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_context_only_protocol_feeds_the_question_after_per_layer_budgets(implementation):
    """A question fed after a PyramidKV prefill (layers of different lengths) is causal."""
    from capkv.models import build_tiny_model

    model, _ = build_tiny_model(seed=0, attn_implementation=implementation)
    context = random_prompt(model.config.vocab_size, PROMPT)
    question = random_prompt(model.config.vocab_size, 12, seed=9)
    full = torch.cat([context, question], dim=1)
    reference = model.generate(
        full,
        attention_mask=torch.ones_like(full),
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
    )[0, full.shape[1] :].tolist()
    # Nothing evicted: the split prefill matches one prefill of the whole prompt.
    cache, _, _ = prefill(model, PyramidKV(window=8), context, budget=PROMPT)
    assert greedy_generate(model, cache, PROMPT, 6, input_ids=question) == reference
    # Evicted with per-layer budgets: the question still decodes at positions PROMPT onwards.
    cache, record, _ = prefill(model, PyramidKV(window=8), context, budget=BUDGET)
    assert len(set(record.kept_per_layer())) > 1
    seen_positions = []
    hook = model.model.rotary_emb.register_forward_hook(
        record_positions(seen_positions), with_kwargs=True
    )
    try:
        tokens = greedy_generate(model, cache, PROMPT, 3, input_ids=question)
    finally:
        hook.remove()
    assert len(tokens) == 3
    assert seen_positions[0] == list(range(PROMPT, PROMPT + 12))
    assert seen_positions[1] == [PROMPT + 12]


def test_generation_continues_at_the_original_positions(gqa_model):
    model, _ = gqa_model
    input_ids = random_prompt(model.config.vocab_size, PROMPT)
    seen_positions = []
    hook = model.model.rotary_emb.register_forward_hook(
        record_positions(seen_positions), with_kwargs=True
    )
    try:
        with evict(model, SnapKV(window=8), budget=BUDGET):
            model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=3,
                do_sample=False,
                pad_token_id=0,
            )
    finally:
        hook.remove()
    assert [p[-1] for p in seen_positions] == [PROMPT - 1, PROMPT, PROMPT + 1]


def test_model_is_unchanged_outside_the_context(gqa_model):
    model, _ = gqa_model
    input_ids = random_prompt(model.config.vocab_size, PROMPT)
    before = model(input_ids).logits
    prefill(model, CapKV(), input_ids, budget=BUDGET)
    for module in attention_layers(model):
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert torch.equal(model(input_ids).logits, before)


def test_batches_larger_than_one_are_refused(gqa_model):
    model, _ = gqa_model
    input_ids = random_prompt(model.config.vocab_size, PROMPT).repeat(2, 1)
    with pytest.raises(ValueError, match="batch size 1"):
        prefill(model, SnapKV(window=8), input_ids, budget=BUDGET)


@pytest.mark.parametrize(
    ("make", "budget", "message"),
    [
        (CapKV, {"budget": 0}, "positive"),
        (CapKV, {"budget": -3}, "positive"),
        (lambda: SnapKV(window=32), {"budget": 32}, "budget above 32"),
        (lambda: H2O(window=64), {"budget": 16}, "budget above 64"),
        (lambda: StreamingLLM(n_sink=4), {"budget": 4}, "budget above 4"),
        (CapKV, {"ratio": 1.0}, r"\[0, 1\)"),
        (CapKV, {"ratio": -0.1}, r"\[0, 1\)"),
        (CapKV, {"budget": 64, "ratio": 0.5}, "exactly one"),
        (CapKV, {}, "exactly one"),
    ],
)
def test_bad_budgets_raise_one_clear_sentence(make, budget, message, gqa_model):
    model, _ = gqa_model
    with pytest.raises(ValueError, match=message):
        with evict(model, make(), **budget):
            pass


def test_a_ratio_too_strong_for_the_window_is_explained(gqa_model):
    model, _ = gqa_model
    input_ids = random_prompt(model.config.vocab_size, PROMPT)
    with pytest.raises(ValueError, match="fewer than the 32 tokens"):
        prefill(model, SnapKV(window=32), input_ids, ratio=0.9)


@pytest.mark.parametrize(
    "make",
    [
        lambda: SnapKV(window=0),
        lambda: SnapKV(kernel=4),
        lambda: SnapKV(pooling="median"),
        lambda: PyramidKV(beta=0),
        lambda: CapKV(tau=-1.0),
        lambda: CapKV(n_future=0),
        lambda: H2O(chunk=0),
    ],
)
def test_bad_hyperparameters_raise(make):
    with pytest.raises(ValueError):
        make()


def test_unsupported_family_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="gpt2"):
        with evict(model, CapKV(), budget=16):
            pass


def test_budget_labels():
    assert Budget(tokens=512).label == "budget512"
    assert Budget(ratio=0.5).label == "ratio0.5"
    assert Budget(ratio=0.25).n_kept(1000) == 750
