"""kvpress presses through this harness against kvpress's own hooks, and our methods as presses.

Both sides run the same press code on the same prefill state, so kept sets must be identical
(no tie tolerance): every supported scorer press, in every layer and KV head, under sdpa (presses
that recompute attention themselves) and eager (presses given the attention weights).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import DynamicCache

from capkv.interop import kvpress_problem
from tests.conftest import require_kvpress

require_kvpress(kvpress_problem(), "kvpress")

import kvpress  # noqa: E402

from baselines import H2O, PyramidKV, SnapKV, StreamingLLM  # noqa: E402
from capkv import Budget, CapKV  # noqa: E402
from capkv.engine.compression import record_kept  # noqa: E402
from capkv.engine.hooks import run_with_cache  # noqa: E402
from capkv.interop import SUPPORTED_PRESSES, KvpressMethod, as_press  # noqa: E402
from capkv.interop.scorers import HUB_PRESSES, NEEDS_ATTENTIONS, RATIO_DEPENDENT  # noqa: E402
from capkv.models import build_tiny_model  # noqa: E402
from tests.conftest import capture_prefill, random_prompt  # noqa: E402
from tests.methods.test_oracles import kvpress_kept, our_kept  # noqa: E402

PROMPT = 128
# Settings small enough for a 128-token prompt (kvpress's defaults suit thousands of tokens).
SETTINGS = {
    "CapPress": {"n_future_positions": 64},
    "ExpectedAttentionPress": {"n_future_positions": 64},
    "CompactorPress": {"sink_size_start": 4, "sink_size_end": 8, "chunk_size": 64},
    "CURPress": {"num_sinks": 4, "local_window_size": 8},
    "LagKVPress": {"n_sink": 4, "lag_size": 16},
    "LeverageScorePress": {"sketch_dimension": 16},
    "NonCausalAttnPress": {"chunk_size": 64},
    "PyramidKVPress": {"window_size": 8, "kernel_size": 5},
    "RandomPress": {"seed": 3},
    "SnapKVPress": {"window_size": 8, "kernel_size": 5},
}


def test_the_supported_presses_are_kvpress_scorers_that_need_no_download():
    """Every ScorerPress of kvpress that is not a wrapper of another press (CriticalKVPress) and
    reads no downloaded weights is supported; non-scorers (DuoAttention, KVzip, ThinK...) are not."""
    scorers = {
        name
        for name in kvpress.__all__
        if inspect.isclass(cls := getattr(kvpress, name))
        and issubclass(cls, kvpress.ScorerPress)
        and cls is not kvpress.ScorerPress
        and "press" not in inspect.signature(cls).parameters
    }
    assert scorers - set(HUB_PRESSES) == set(SUPPORTED_PRESSES)
    assert "DuoAttentionPress" not in scorers and "KVzipPress" not in scorers


@pytest.fixture(scope="module")
def eager_model():
    """The GQA tiny model with eager attention, which returns the attention weights."""
    return build_tiny_model(
        seed=0, num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager"
    )


def both_kept(model, press_name, input_ids, ratio):
    """Kept indices per layer through this harness and through kvpress's own hooks."""
    settings = SETTINGS.get(press_name, {})
    torch.manual_seed(0)  # presses that draw (random projections) use torch's generator
    ours = our_kept(
        model, KvpressMethod(press=press_name, kwargs=settings, seed=None), input_ids, ratio=ratio
    )
    press = getattr(kvpress, press_name)(compression_ratio=ratio, **settings)
    torch.manual_seed(0)
    return ours, kvpress_kept(model, press, input_ids)


@pytest.mark.parametrize(
    ("press_name", "attention"),
    [
        (press, attention)
        for press in SUPPORTED_PRESSES
        for attention in ("sdpa", "eager")
        if attention == "eager" or press not in NEEDS_ATTENTIONS  # refusal tested below
    ],
)
def test_every_supported_press_keeps_what_kvpress_keeps(
    press_name, attention, gqa_model, eager_model
):
    model, _ = eager_model if attention == "eager" else gqa_model
    input_ids = random_prompt(model.config.vocab_size, PROMPT, seed=11)
    ours, reference = both_kept(model, press_name, input_ids, ratio=0.5)
    assert ours.keys() == reference.keys() == set(range(4))
    for layer_idx in ours:
        assert torch.equal(ours[layer_idx], reference[layer_idx]), f"layer {layer_idx}"


@pytest.mark.parametrize("press_name", [*RATIO_DEPENDENT, "PyramidKVPress"])
def test_ratio_dependent_presses_follow_the_ratio_and_token_budgets(press_name, gqa_model):
    """Presses whose scores or per-layer counts depend on the ratio: another ratio, and a token
    budget given to the press as the ratio that keeps as many tokens."""
    model, _ = gqa_model
    input_ids = random_prompt(model.config.vocab_size, PROMPT, seed=12)
    ours, reference = both_kept(model, press_name, input_ids, ratio=0.75)
    assert all(torch.equal(ours[i], reference[i]) for i in ours)
    method = KvpressMethod(press=press_name, kwargs=SETTINGS.get(press_name, {}))
    by_tokens = our_kept(model, method, input_ids, budget=PROMPT // 4)
    by_ratio = our_kept(model, method, input_ids, ratio=0.75)
    assert all(torch.equal(by_tokens[i], by_ratio[i]) for i in by_ratio)


def test_other_presses_score_the_same_whatever_the_ratio(gqa_model):
    """Sweeps score a press once per layer for all its budgets: only RATIO_DEPENDENT presses'
    scores may depend on the ratio."""
    model, _ = gqa_model
    states = capture_prefill(model, random_prompt(model.config.vocab_size, 64, seed=13))
    for press_name in set(SUPPORTED_PRESSES) - set(RATIO_DEPENDENT) - set(NEEDS_ATTENTIONS):
        method = KvpressMethod(press=press_name, kwargs=SETTINGS.get(press_name, {}))
        scores = []
        for ratio in (0.25, 0.75):
            method.kept_count(states[1], Budget(ratio=ratio))
            scores.append(method.score(states[1]))
        assert torch.equal(*scores), press_name


def test_a_sweep_keeps_what_separate_runs_keep(gqa_model):
    model, _ = gqa_model
    input_ids = random_prompt(model.config.vocab_size, PROMPT, seed=14)
    presses = {
        name: KvpressMethod(press=name, kwargs=SETTINGS.get(name, {}))
        for name in ("TOVAPress", "StreamingLLMPress", "PyramidKVPress")
    }
    budgets = [Budget(ratio=0.5), Budget(tokens=64)]
    selections = [(method, budget) for method in presses.values() for budget in budgets]
    with record_kept(model, selections) as records:
        run_with_cache(model.model, input_ids, DynamicCache())
    for (method, budget), record in zip(selections, records, strict=True):
        separate = our_kept(model, method, input_ids, budget=budget)
        assert all(torch.equal(record.kept[i][0], separate[i]) for i in separate), method.press


def test_a_press_needing_attention_weights_is_refused_without_them(gqa_model):
    model, _ = gqa_model
    with pytest.raises(ValueError, match="only eager attention returns"):
        our_kept(
            model,
            KvpressMethod(press="ObservedAttentionPress"),
            random_prompt(model.config.vocab_size, 32),
            ratio=0.5,
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"window": 8},
            "SnapKVPress has no setting 'window'; its settings are: window_size, kernel_size",
        ),
        ({"compression_ratio": 0.5}, "the budget comes from budget=N or ratio=R"),
    ],
)
def test_bad_press_settings_are_refused_in_one_sentence(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KvpressMethod(press="SnapKVPress", kwargs=kwargs)


# ---------------------------------------------------------------- our methods as kvpress presses


OUR_METHODS = {
    "capkv": (CapKV(), {"ratio": 0.5}),
    "h2o": (H2O(window=8, chunk=48), {"ratio": 0.75}),  # chunked: 3 chunks
    "snapkv-max": (SnapKV(window=8, kernel=7, pooling="max"), {"ratio": 0.5}),
    "pyramidkv": (PyramidKV(window=8, kernel=7, pooling="max", beta=20), {"budget": 64}),
    "streamingllm": (StreamingLLM(n_sink=4), {"budget": 48}),
}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", OUR_METHODS)
def test_our_methods_as_presses_keep_what_our_engine_keeps(name, attention, gqa_model, eager_model):
    model, _ = eager_model if attention == "eager" else gqa_model
    method, budget = OUR_METHODS[name]
    input_ids = random_prompt(model.config.vocab_size, PROMPT, seed=15)
    press = as_press(
        method, compression_ratio=budget.get("ratio", 0.0), budget=budget.get("budget")
    )
    ours = our_kept(model, method, input_ids, **budget)
    theirs = kvpress_kept(model, press, input_ids)
    assert ours.keys() == theirs.keys() and ours
    for layer_idx in ours:
        assert torch.equal(ours[layer_idx], theirs[layer_idx]), f"layer {layer_idx}"


def test_our_press_runs_in_kvpress_pipeline(gqa_model):
    """kvpress's text-generation pipeline generates with our press, compressing the context."""
    model, tokenizer = gqa_model
    from transformers import pipeline

    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    press = as_press(CapKV(), compression_ratio=0.5)
    context = "the quick brown fox jumps over the lazy dog " * 20
    answer = pipe(context, question=" what jumps?", press=press, max_new_tokens=3)["answer"]
    assert isinstance(answer, str)
