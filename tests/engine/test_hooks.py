"""The hooks never let a prefill run uncompressed: whatever the transformers release does with
the cache argument, a prefill inside ``evict`` or ``record_kept`` compresses (or records) every
layer, or raises one error naming the transformers version."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import DynamicCache

from baselines import SnapKV
from capkv import CapKV, evict
from capkv.engine import hooks
from capkv.engine.compression import record_kept
from capkv.engine.hooks import (
    TransformersMismatch,
    attention_layers,
    crop_cache,
    decoder,
    forward_hooks,
    library_versions,
    run_with_cache,
)
from tests.conftest import random_prompt

PROMPT = 120
BUDGET = 32


def rename_cache_argument(model, new_name: str):
    """Hooks that make every attention layer receive its cache as ``new_name``, as a
    transformers release that renamed the argument would."""

    def rename(module, args, kwargs):
        for name in hooks.CACHE_ARGUMENTS:
            if kwargs.get(name) is not None:
                kwargs[new_name] = kwargs.pop(name)
        return args, kwargs

    return forward_hooks(attention_layers(model), pre=rename)


def eviction_contexts(model):
    """``evict`` and sweep mode's ``record_kept``, both expected to refuse silent prefills."""
    return {
        "evict": lambda: evict(model, CapKV(), budget=BUDGET),
        "record_kept": lambda: record_kept(model, [(SnapKV(window=8), None), (CapKV(), None)]),
    }


@pytest.mark.parametrize("context", ["evict", "record_kept"])
def test_a_cache_under_an_unknown_argument_name_raises_naming_the_version(context, gqa_model):
    model, _ = gqa_model
    input_ids = random_prompt(model.config.vocab_size, PROMPT)
    with rename_cache_argument(model, "kv_cache"), torch.no_grad():
        with pytest.raises(TransformersMismatch) as raised:
            with eviction_contexts(model)[context]():
                run_with_cache(model, input_ids, DynamicCache())
    message = str(raised.value)
    assert "'kv_cache'" in message
    assert f"transformers {transformers.__version__}" in message
    assert "\n" not in message


@pytest.mark.parametrize("context", ["evict", "record_kept"])
def test_a_lookup_under_outdated_names_raises_instead_of_skipping(context, gqa_model, monkeypatch):
    # The bug this guards against: transformers renamed the argument, capkv looked under the
    # old names only, found nothing and treated every forward as "not a prefill".
    model, _ = gqa_model
    input_ids = random_prompt(model.config.vocab_size, PROMPT)
    monkeypatch.setattr(hooks, "CACHE_ARGUMENTS", ("outdated_name",))
    with torch.no_grad(), pytest.raises(TransformersMismatch, match="no cache could be compressed"):
        with eviction_contexts(model)[context]():
            model(input_ids)  # the model makes its own DynamicCache
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in attention_layers(model))
    assert not decoder(model)._forward_hooks and not decoder(model)._forward_pre_hooks


@pytest.mark.parametrize("context", ["evict", "record_kept"])
def test_a_first_forward_that_is_not_a_prefill_raises(context, gqa_model):
    model, _ = gqa_model
    input_ids = random_prompt(model.config.vocab_size, PROMPT)
    cache = DynamicCache()
    with torch.no_grad():
        run_with_cache(model, input_ids, cache)  # filled outside the context
        with pytest.raises(TransformersMismatch, match="in 0 of the model's 4 attention layers"):
            with eviction_contexts(model)[context]():
                run_with_cache(model, input_ids[:, :5], cache)


def test_a_forward_without_a_cache_inside_evict_raises(gqa_model):
    model, _ = gqa_model
    input_ids = random_prompt(model.config.vocab_size, PROMPT)
    with torch.no_grad(), pytest.raises(TransformersMismatch, match="use_cache"):
        with evict(model, CapKV(), budget=BUDGET):
            model(input_ids, use_cache=False)


def test_every_layer_is_compressed_by_a_prefill_inside_evict(gqa_model):
    model, _ = gqa_model
    input_ids = random_prompt(model.config.vocab_size, PROMPT)
    cache = DynamicCache()
    with torch.no_grad(), evict(model, CapKV(), budget=BUDGET) as record:
        run_with_cache(model, input_ids, cache)
        run_with_cache(model, input_ids[:, :1], cache)  # a decoding step is not a prefill
    assert record.prompt_length == PROMPT
    assert record.kept_per_layer() == [BUDGET] * len(attention_layers(model))
    assert [layer.keys.shape[2] for layer in cache.layers] == [BUDGET + 1] * len(cache.layers)


def test_crop_cache_keeps_the_first_tokens(gqa_model):
    model, _ = gqa_model
    input_ids = random_prompt(model.config.vocab_size, PROMPT)
    cache = DynamicCache()
    with torch.no_grad():
        run_with_cache(model, input_ids, cache)
    first_keys = cache.layers[0].keys[..., :100, :].clone()
    crop_cache(cache, PROMPT)  # already that long: unchanged
    assert cache.get_seq_length() == PROMPT
    crop_cache(cache, 100)
    assert cache.get_seq_length() == 100
    assert torch.equal(cache.layers[0].keys, first_keys)


def test_library_versions_name_the_installed_releases():
    assert library_versions() == {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
