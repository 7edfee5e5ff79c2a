"""Head-adaptive and model-wide allocations: the pooled selection, per-head decoding masks, and
CapKV's allocation against its own objective."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from baselines import SnapKV
from capkv import Budget, CapKV, evict, greedy_generate, log_det_capacity
from capkv.engine.allocation import PADDING, head_floor, padded_indices, pooled_selection
from capkv.engine.compression import gathered_cache, record_kept
from capkv.engine.decoding import head_causal_mask, per_layer_masks, set_head_mask
from capkv.engine.hooks import run_with_cache
from capkv.models import build_tiny_model
from tests.conftest import capture_prefill, random_prompt

PROMPT = 160


ROOT = Path(__file__).resolve().parents[2]


def test_pooled_selection_keeps_the_pool_size_floors_and_protected_tokens():
    scores = torch.rand(1, 3, 50, generator=torch.Generator().manual_seed(0))
    scores[0, 0] += 10.0  # head 0 outranks the others everywhere
    scores[..., -4:] = float("inf")  # protected
    n_kept, floor = 20, head_floor(20, 0.25, 4)
    mask = pooled_selection(scores, torch.full((3,), n_kept), torch.full((3,), floor))
    counts = mask.sum(-1)[0].tolist()
    assert sum(counts) == 3 * n_kept
    assert counts == [n_kept + 2 * (n_kept - floor), floor, floor]
    assert bool(mask[..., -4:].all())
    for head in (1, 2):  # a floored head keeps its own best tokens
        best = scores[0, head].topk(floor).indices
        assert bool(mask[0, head, best].all())


def test_a_floor_of_one_is_the_uniform_top_k():
    scores = torch.randn(2, 4, 30, generator=torch.Generator().manual_seed(1))
    rows = torch.full((4,), 12)
    indices = padded_indices(pooled_selection(scores, rows, rows))
    assert torch.equal(indices, scores.topk(12, dim=-1).indices.sort(-1).values)


def test_padded_indices_pad_each_head_after_its_sorted_tokens():
    mask = torch.zeros(1, 2, 6, dtype=torch.bool)
    mask[0, 0, [1, 3, 4]] = True
    mask[0, 1, [5]] = True
    assert padded_indices(mask).tolist() == [[[1, 3, 4], [5, PADDING, PADDING]]]


def test_head_causal_mask_hides_each_heads_padding_from_its_query_heads():
    head_mask = torch.tensor([[[True, True, True], [True, False, False]]])
    allowed = head_causal_mask(head_mask, 4, 2, 2, "sdpa", torch.float32)
    assert allowed.shape == (1, 4, 2, 6)
    assert allowed[0, 0].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert allowed[0, 2].tolist() == [[1, 0, 0, 1, 1, 0], [1, 0, 0, 1, 1, 1]]
    assert torch.equal(allowed[0, 0], allowed[0, 1]) and torch.equal(allowed[0, 2], allowed[0, 3])
    additive = head_causal_mask(head_mask, 4, 2, 2, "eager", torch.float32)
    assert torch.equal(additive == 0, allowed)
    with pytest.raises(ValueError, match="flash_attention_2 cannot mask each KV head"):
        head_causal_mask(head_mask, 4, 1, 2, "flash_attention_2", torch.float32)


def compressed(model, method, input_ids, **budget):
    cache = DynamicCache()
    with torch.no_grad(), evict(model, method, **budget) as record:
        logits = run_with_cache(model, input_ids, cache).logits[0, -1]
    return cache, record, logits


def next_logits(model, cache, token: int) -> torch.Tensor:
    """Logits after feeding ``token`` into a (copied) compressed cache, under per-layer masks."""
    copy = DynamicCache()
    for layer_idx, layer in enumerate(cache.layers):
        copy.update(layer.keys.clone(), layer.values.clone(), layer_idx)
        if hasattr(layer, "capkv_head_mask"):
            copy.layers[layer_idx].capkv_head_mask = layer.capkv_head_mask
    with torch.no_grad(), per_layer_masks(model):
        position = torch.tensor([[PROMPT]])
        return run_with_cache(model, torch.tensor([[token]]), copy, position_ids=position).logits


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_decoding_attends_only_to_each_heads_own_tokens(implementation):
    model, _ = build_tiny_model(seed=0, attn_implementation=implementation)
    input_ids = random_prompt(model.config.vocab_size, PROMPT, seed=4)
    cache, record, _ = compressed(model, CapKV(allocation="adaptive"), input_ids, budget=48)
    ragged = [i for i, kept in record.kept.items() if bool((kept == PADDING).any())]
    assert ragged, "the adaptive allocation gave some layer heads of different lengths"
    reference = next_logits(model, cache, 7)
    # Whatever the padding slots hold, the output is the same: they are masked.
    for layer_idx in ragged:
        layer, padding = cache.layers[layer_idx], record.kept[layer_idx] == PADDING
        layer.keys[padding] = torch.randn_like(layer.keys[padding]) * 100
        layer.values[padding] = torch.randn_like(layer.values[padding]) * 100
    assert torch.allclose(next_logits(model, cache, 7), reference, atol=1e-5)
    # The same kept sets as masks over the whole uncompressed cache give the same output.
    full = DynamicCache()
    with torch.no_grad():
        run_with_cache(model, input_ids, full)
    for layer_idx, kept in record.kept.items():
        present = torch.zeros(*kept.shape[:2], PROMPT, dtype=torch.long)
        present.scatter_add_(-1, kept.clamp(min=0), (kept != PADDING).long())
        full.layers[layer_idx].capkv_head_mask = present > 0
    assert torch.allclose(next_logits(model, full, 7), reference, atol=1e-5)


def test_eager_and_sdpa_decode_a_ragged_cache_alike():
    tokens = []
    for implementation in ("eager", "sdpa"):
        model, _ = build_tiny_model(seed=0, attn_implementation=implementation)
        input_ids = random_prompt(model.config.vocab_size, PROMPT, seed=6)
        cache, _, logits = compressed(
            model, SnapKV(window=8, allocation="adaptive"), input_ids, budget=40
        )
        tokens.append(greedy_generate(model, cache, PROMPT, 8, next_token_logits=logits))
    assert tokens[0] == tokens[1]


def test_a_floor_of_one_keeps_and_generates_as_the_uniform_allocation(gqa_model):
    model, _ = gqa_model
    input_ids = random_prompt(model.config.vocab_size, PROMPT, seed=8)
    outputs = []
    # Average pooling: max pooling copies scores to neighbours, and the two selections may break
    # such exact ties differently.
    uniform, adaptive = SnapKV(window=8, pooling="avg"), SnapKV(window=8, pooling="avg", floor=1)
    adaptive.allocation = "adaptive"
    for method in (uniform, adaptive):
        cache, record, logits = compressed(model, method, input_ids, budget=48)
        tokens = greedy_generate(model, cache, PROMPT, 6, next_token_logits=logits)
        outputs.append((record.kept, tokens))
    (uniform, uniform_tokens), (adaptive, adaptive_tokens) = outputs
    assert all(torch.equal(uniform[i], adaptive[i]) for i in uniform)
    assert uniform_tokens == adaptive_tokens


def test_a_sweep_gathers_the_ragged_caches_evict_writes(gqa_model):
    model, _ = gqa_model
    input_ids = random_prompt(model.config.vocab_size, PROMPT, seed=9)
    methods = [CapKV(allocation="model"), SnapKV(window=8, allocation="adaptive"), CapKV()]
    full = DynamicCache()
    with torch.no_grad(), record_kept(model, [(m, Budget(tokens=40)) for m in methods]) as records:
        run_with_cache(model, input_ids, full)
    for method, record in zip(methods, records, strict=True):
        cache, separate, logits = compressed(model, method, input_ids, budget=40)
        assert separate.kept_per_head() == record.kept_per_head()
        gathered = gathered_cache(full, record)
        for layer_idx, kept in separate.kept.items():
            assert torch.equal(kept, record.kept[layer_idx])
            mask = getattr(cache.layers[layer_idx], "capkv_head_mask", None)
            assert torch.equal(gathered.layers[layer_idx].keys, cache.layers[layer_idx].keys)
            if mask is not None:
                assert torch.equal(gathered.layers[layer_idx].capkv_head_mask, mask)
        assert greedy_generate(model, gathered, PROMPT, 5, next_token_logits=logits) == (
            greedy_generate(model, cache, PROMPT, 5, next_token_logits=logits)
        )


def test_set_head_mask_marks_only_ragged_layers():
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), 0)
    set_head_mask(cache.layers[0], torch.tensor([[[0, 1, 2], [0, 2, PADDING]]]))
    assert cache.layers[0].capkv_head_mask.tolist() == [[[True] * 3, [True, True, False]]]
    set_head_mask(cache.layers[0], torch.tensor([[[0, 1, 2], [0, 1, 2]]]))
    assert not hasattr(cache.layers[0], "capkv_head_mask")


def summed_capacity(method: CapKV, states, budget: Budget) -> float:
    """Log-det capacity (nats) of the kept sets, summed over layers and KV heads."""
    if method.model_wide:
        kept = method.select_model_wide(states, budget)
    else:
        kept = [method.kept_indices(state, budget) for state in states]
    return sum(float(CapKV().capacity(s, k).sum()) for s, k in zip(states, kept, strict=True))


@pytest.mark.parametrize("model_name", ["gqa_model", "mha_model"])
def test_capkv_allocations_retain_at_least_the_uniform_capacity(model_name, request):
    """At the same total budget, spending it where the removal costs are keeps at least the
    capacity of a uniform budget, and removing in rounds at least the one-shot's."""
    model, _ = request.getfixturevalue(model_name)
    states = capture_prefill(model, random_prompt(model.config.vocab_size, PROMPT, seed=7))
    with torch.no_grad():
        for tokens in (16, 48):
            budget = Budget(tokens=tokens)
            capacity = {
                name: summed_capacity(method, states, budget)
                for name, method in {
                    "uniform": CapKV(),
                    "heads": CapKV(allocation="adaptive"),
                    "model": CapKV(allocation="model"),
                    "uniform_iterative": CapKV(rounds=4),
                    "heads_iterative": CapKV(allocation="adaptive", rounds=4),
                }.items()
            }
            assert capacity["heads"] >= capacity["uniform"], (tokens, capacity)
            assert capacity["model"] >= capacity["uniform"], (tokens, capacity)
            assert capacity["uniform_iterative"] >= capacity["uniform"], (tokens, capacity)
            assert capacity["heads_iterative"] >= capacity["heads"], (tokens, capacity)


def test_iterative_costs_are_recomputed_against_the_kept_set(gqa_model):
    """Removing tokens raises the leverage of the rest: costs against a smaller kept set are
    at least the costs against the whole pool (A shrinks, so v^T A^-1 v grows)."""
    model, _ = gqa_model
    (state, *_) = capture_prefill(model, random_prompt(model.config.vocab_size, PROMPT))
    method = CapKV(allocation="adaptive")
    with torch.no_grad():
        whole = method.removal_costs(state)
        alive = torch.rand(whole.shape, generator=torch.Generator().manual_seed(0)) < 0.5
        alive[..., : method.n_sink] = True
        smaller = method.removal_costs(state, alive)
    assert bool((smaller[alive] >= whole[alive] - 1e-6).all())
    assert bool((smaller[~alive] == float("-inf")).all())


def test_allocation_figure_draws_capkv_beside_pyramidkv_from_the_table(tmp_path, gqa_model):
    from capkv.figures.allocation import draw_allocations, read_table

    spec = importlib.util.spec_from_file_location(
        "allocation_map", ROOT / "scripts" / "allocation_map.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model, tokenizer = gqa_model
    per_head, schedule, length = script.allocations(model, tokenizer, 300, 50.0, Budget(ratio=0.5))
    assert per_head.shape == (4, 2) and len(schedule) == 4
    assert per_head.sum() == 4 * 2 * int(length * 0.5)  # one model-wide budget, spent exactly
    table = tmp_path / "results" / "allocation" / "tiny_allocation_ratio0.5.csv"
    table.parent.mkdir(parents=True)
    script.allocation_table(per_head, schedule).to_csv(table, index=False)
    table.with_suffix(".json").write_text(
        json.dumps({"model": "tiny", "depth": 50.0, "prompt_tokens": length, "budget": "ratio0.5"})
    )
    read_head, read_schedule, title = read_table(table)  # the figure reads what the run wrote
    assert (read_head == per_head).all() and read_schedule == pytest.approx(schedule)
    assert "depth 50%" in title and f"{length} tokens" in title
    (plot,) = draw_allocations(tmp_path / "results", tmp_path / "plots")
    assert plot == tmp_path / "plots" / "tiny_allocation_ratio0.5.png" and plot.stat().st_size > 0


def attend(query, keys, values, scaling):
    return torch.softmax(query @ keys.T * scaling, -1) @ values


@torch.no_grad()
def test_diagnostics_count_only_each_heads_own_tokens(gqa_model):
    from capkv.analysis.diagnostics import CapacityProbe, attention_errors, decoding_queries

    model, _ = gqa_model
    input_ids = random_prompt(model.config.vocab_size, PROMPT, seed=10)
    probe, full = CapacityProbe(1), DynamicCache()
    selections = [(CapKV(allocation="model"), Budget(tokens=40))]
    with torch.no_grad(), record_kept(model, selections, probe.on_layer) as records:
        logits = run_with_cache(model, input_ids, full).logits[0, -1]
        states = capture_prefill(model, input_ids)
        queries = decoding_queries(model, full, logits.argmax().view(1, 1), PROMPT)
        (error,) = attention_errors(model, full, queries, records)
    (record,) = records
    fractions, errors = [], []
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    for layer_idx, state in enumerate(states):
        kept = record.kept[layer_idx]
        real = [row[row >= 0] for row in kept[0]]
        weights = CapKV().relevance_weights(state)[0]  # (H_kv, G, T), per query head
        values = state.values[0]
        fractions.append(
            sum(
                float(
                    log_det_capacity(values[kv, rows], weights[kv, g, rows])
                    / log_det_capacity(values[kv], weights[kv, g])
                )
                for kv, rows in enumerate(real)
                for g in range(group)
            )
            / (len(real) * group)
        )
        keys, values = full.layers[layer_idx].keys[0], full.layers[layer_idx].values[0]
        outputs, references = [], []
        for head in range(model.config.num_attention_heads):
            query, kv = queries[layer_idx][0, head], head // group
            scaling = model.model.layers[layer_idx].self_attn.scaling
            rows = real[kv]
            outputs.append(attend(query, keys[kv, rows], values[kv, rows], scaling))
            references.append(attend(query, keys[kv], values[kv], scaling))
        outputs, references = torch.stack(outputs), torch.stack(references)
        errors.append(float((outputs - references).norm() / references.norm()))
    assert abs(probe.mean(0) - sum(fractions) / len(fractions)) < 1e-5
    assert abs(error - sum(errors) / len(errors)) < 1e-5


def test_a_folder_written_before_allocations_existed_resumes(tmp_path):
    """A stored config without the allocation keys matches their defaults, not other values."""
    from omegaconf import OmegaConf

    from capkv.harness.runner import check_same_config
    from capkv.results.store import CONFIG

    old = {"_target_": "capkv.CapKV", "tau": 5.0, "n_future": 512, "n_sink": 4, "eps": 1e-6}
    stored = {"model": {"name": "m"}, "task": {"name": "t"}, "method": old}
    (tmp_path / CONFIG).write_text(OmegaConf.to_yaml(stored))
    now = {**old, "allocation": "uniform", "floor": 0.2, "rounds": 1}
    check_same_config(tmp_path, {**stored, "method": now})
    with pytest.raises(ValueError, match="differs in method.allocation"):
        check_same_config(tmp_path, {**stored, "method": {**now, "allocation": "adaptive"}})
