"""Our methods as kvpress presses under every kvpress 0.5.5 wrapper (issue 32).

Each (wrapper, our press) either keeps what the same wrapper keeps around kvpress's own press
(the same cache length in every layer and KV head, and, where kvpress has a twin of the method,
the same kept tokens), or refuses in one line when applied. Run on a tiny GQA and a tiny MHA
model, eager and sdpa, batch 1 and 3. docs/kvpress.md is the table of these results.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from capkv.interop import kvpress_problem
from tests.conftest import require_kvpress

require_kvpress(kvpress_problem(), "kvpress")

import kvpress  # noqa: E402

from baselines import H2O, PyramidKV, SnapKV, StreamingLLM, pyramid_schedule  # noqa: E402
from capkv import Budget, CapKV  # noqa: E402
from capkv.engine.hooks import attention_layers, run_with_cache  # noqa: E402
from capkv.interop import as_press  # noqa: E402
from capkv.models import build_tiny_model  # noqa: E402
from tests.conftest import capture_prefill  # noqa: E402

PROMPT = 48
RATIO = 0.5
# Our methods with settings for a 48-token prompt, and kvpress's twin press where one keeps
# exactly the same tokens (None: no twin; PyramidKV's schedule is not PyramidKVPress's).
METHODS = {
    "capkv": (lambda: CapKV(n_future=16), lambda r: kvpress.CapPress(r, n_future_positions=16)),
    "snapkv": (
        lambda: SnapKV(window=8, kernel=5, pooling="avg"),
        lambda r: kvpress.SnapKVPress(r, window_size=8, kernel_size=5),
    ),
    "streamingllm": (lambda: StreamingLLM(n_sink=4), lambda r: kvpress.StreamingLLMPress(r)),
    "h2o": (lambda: H2O(window=8, chunk=16), None),
    "pyramidkv": (lambda: PyramidKV(window=8, kernel=5, pooling="avg"), None),
}
# Wrappers of one prefill press, built around ``press``.
PREFILL_WRAPPERS = {
    "AdaKVPress": lambda press: kvpress.AdaKVPress(press),
    "CriticalKVPress": lambda press: kvpress.CriticalKVPress(press),
    "CriticalAdaKVPress": lambda press: kvpress.CriticalAdaKVPress(press),
    "PerLayerCompressionPress": lambda press: kvpress.PerLayerCompressionPress(
        press, [0.25, 1.0, 0.5, 0.75]
    ),
    "ComposedPress-first": lambda press: kvpress.ComposedPress([press, kvpress.KnormPress(0.5)]),
    "ComposedPress-later": lambda press: kvpress.ComposedPress([kvpress.KnormPress(0.25), press]),
    "KeyRerotationPress": lambda press: kvpress.KeyRerotationPress(press),
    "ChunkPress": lambda press: kvpress.ChunkPress(press, chunk_length=16),
    "ChunkKVPress": lambda press: kvpress.ChunkKVPress(press, chunk_length=6),
    "EntropyGatedChunkKVPress": lambda press: kvpress.EntropyGatedChunkKVPress(
        press, chunk_length=6, low_entropy_chunk_length=3
    ),
    "BlockPress": lambda press: kvpress.BlockPress(press, block_size=16),
    "MergingPress": lambda press: kvpress.MergingPress(press),
    "PrefillDecodingPress": lambda press: kvpress.PrefillDecodingPress(prefilling_press=press),
    "DMSPress": lambda press: kvpress.DMSPress(press, threshold=0.1, sliding_window_size=16),
    "LUKVPress": lambda press: kvpress.LUKVPress(press, compression_ratio=RATIO),
}
MASKING = ("AdaKVPress", "CriticalAdaKVPress")  # mask keys per head instead of pruning
# Our refusals, (wrapper, method) -> words of the one-line reason.
REFUSED = {
    **{(w, "pyramidkv"): "per-layer schedule" for w in PREFILL_WRAPPERS},
    **{("ChunkPress", m): "rotary tables" for m in ("snapkv", "h2o")},
    **{("BlockPress", m): "rotary tables" for m in ("snapkv", "h2o")},
    **{("ComposedPress-later", m): "put it first" for m in ("capkv", "h2o")},
    **{("DMSPress", m): "fixed threshold" for m in METHODS},
    **{("LUKVPress", m): "budget curves" for m in METHODS},
}
for method in METHODS:  # kvpress's own head budgets are counted over the whole batch
    REFUSED["CriticalAdaKVPress", method, 3] = "one prompt at a time"
for wrapper in ("ComposedPress-first", "ComposedPress-later", "PrefillDecodingPress"):
    REFUSED.pop((wrapper, "pyramidkv"))  # they run a press as it runs alone


def models() -> dict[str, object]:
    built = {}
    for heads, kv_heads in (("gqa", 2), ("mha", 4)):
        for attention in ("sdpa", "eager"):
            built[f"{heads}-{attention}"] = build_tiny_model(
                seed=0,
                num_attention_heads=4,
                num_key_value_heads=kv_heads,
                attn_implementation=attention,
            )[0]
    return built


@pytest.fixture(scope="module")
def tiny_models():
    """The four tiny models, run on one thread: tiny matrices on a busy machine's thread pool
    spend more time waiting for threads than computing (40x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield models()
    torch.set_num_threads(threads)


def prompts(model, batch: int, length: int = PROMPT, seed: int = 5) -> torch.Tensor:
    """Prompts without a repeated token: a repeated token's key has the same norm at any
    position, an exact tie that KnormPress (composed with ours) would break by cache order."""
    generator = torch.Generator().manual_seed(seed)
    rows = [
        torch.randperm(model.config.vocab_size - 3, generator=generator)[:length] + 3
        for _ in range(batch)
    ]
    return torch.stack(rows)


@torch.no_grad()
def prefill(model, press, input_ids) -> DynamicCache:
    cache = DynamicCache()
    with press(model):
        run_with_cache(model.model, input_ids, cache)
    return cache


def cached(model, cache, input_ids, masking: bool) -> list[torch.Tensor]:
    """Per layer, the tokens cached per batch row and KV head, (B, H_kv), masked ones excluded."""
    lengths = []
    for layer_idx, module in enumerate(attention_layers(model)):
        keys = cache.layers[layer_idx].keys
        counts = torch.full(keys.shape[:2], keys.shape[2])
        masked = getattr(module, "masked_key_indices", None) if masking else None
        if masked is not None:
            batch_idx, head_idx, _ = masked
            counts -= torch.bincount(
                batch_idx * keys.shape[1] + head_idx.cpu(), minlength=counts.numel()
            ).view_as(counts)
        lengths.append(counts)
    return lengths


def kept_tokens(model, cache, full, masking: bool) -> list[list[list[set[int]]]]:
    """Per layer, batch row and KV head, the prompt positions still attended to: cached keys
    matched to the full cache's (pruning wrappers), or the unmasked ones (masking wrappers)."""
    kept = []
    for layer_idx, module in enumerate(attention_layers(model)):
        keys, full_keys = cache.layers[layer_idx].keys, full.layers[layer_idx].keys
        bsz, n_kv, length = full_keys.shape[:3]
        if masking:
            alive = torch.ones(bsz, n_kv, length, dtype=torch.bool)
            if module.masked_key_indices is not None:
                alive[tuple(index.cpu() for index in module.masked_key_indices)] = False
            kept.append(
                [
                    [set(alive[b, h].nonzero().flatten().tolist()) for h in range(n_kv)]
                    for b in range(bsz)
                ]
            )
            continue
        match = (keys.unsqueeze(3) == full_keys.unsqueeze(2)).all(-1)  # (B, H, n, T)
        assert (match.sum(-1) == 1).all(), "every kept key matches exactly one prompt position"
        positions = match.float().argmax(-1)
        kept.append([[set(positions[b, h].tolist()) for h in range(n_kv)] for b in range(bsz)])
    return kept


def pyramid_lengths(wrapper: str, model, batch: int) -> list[torch.Tensor]:
    """Per layer, the tokens PyramidKV(window=8) keeps at RATIO under a wrapper that runs it as
    it runs alone: its schedule on the cache it is given (KnormPress(0.25) first, or 0.5 after)."""
    method = METHODS["pyramidkv"][0]()
    length = int(PROMPT * 0.75) if wrapper == "ComposedPress-later" else PROMPT
    n_kept = max(1, int(length * (1 - RATIO)))
    layers = model.config.num_hidden_layers
    schedule = pyramid_schedule(n_kept, method.window, method.beta, layers, length)
    if wrapper == "ComposedPress-first":
        schedule = [max(1, int(n * 0.5)) for n in schedule]
    heads = model.config.num_key_value_heads
    return [torch.full((batch, heads), n) for n in schedule]


def one_line(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


CASES = [
    (wrapper, method, model_name, batch)
    for wrapper in PREFILL_WRAPPERS
    for method in METHODS
    for model_name in ("gqa-sdpa", "gqa-eager", "mha-sdpa", "mha-eager")
    for batch in (1, 3)
    if batch == 1 or model_name.endswith("sdpa")  # batch 3 on both models, sdpa
]


def outcome(model, press, input_ids, full, masking: bool, matched: bool = True):
    """The cache, its lengths per layer (B, H_kv) and its kept tokens, read right after the
    prefill (a masking wrapper's indices live on the model until its next prefill)."""
    cache = prefill(model, press, input_ids)
    kept = kept_tokens(model, cache, full, masking) if matched else None
    return cache, cached(model, cache, input_ids, masking), kept


@pytest.mark.parametrize(("wrapper", "method", "model_name", "batch"), CASES)
def test_a_wrapper_keeps_what_it_keeps_around_kvpress_presses_or_refuses_in_one_line(
    wrapper, method, model_name, batch, tiny_models
):
    model = tiny_models[model_name]
    input_ids = prompts(model, batch)
    build, twin = METHODS[method]
    wrap = PREFILL_WRAPPERS[wrapper]
    masking = wrapper in MASKING
    ours = wrap(as_press(build(), compression_ratio=RATIO))
    full = DynamicCache()
    with torch.no_grad():
        run_with_cache(model.model, input_ids, full)
    # Keys re-rotated cannot be matched to the prompt's: those caches are compared whole.
    matched = wrapper != "KeyRerotationPress"
    # The lengths kvpress's own scorer presses get under this wrapper (KnormPress: any scorer).
    try:
        _, expected, _ = outcome(
            model, wrap(kvpress.KnormPress(RATIO)), input_ids, full, masking, matched
        )
    except Exception:  # noqa: BLE001 kvpress fails this wrapper with its own presses too
        # (eager under AdaKVPress, a batch under CriticalAdaKVPress, no LU-KV curve here...)
        with pytest.raises(Exception):  # noqa: B017
            prefill(model, ours, input_ids)
        return
    refusal = REFUSED.get((wrapper, method)) or REFUSED.get((wrapper, method, batch))
    if refusal is not None:
        with pytest.raises(ValueError) as error:
            prefill(model, ours, input_ids)
        assert refusal in one_line(error.value)
        return
    if method == "pyramidkv":  # its own schedule, on the cache it is given
        expected = pyramid_lengths(wrapper, model, batch)
    cache, lengths, kept = outcome(model, ours, input_ids, full, masking, matched)
    for layer_idx, (mine, theirs) in enumerate(zip(lengths, expected, strict=True)):
        if masking:  # heads keep different numbers: the layer's total is the wrapper's
            assert mine.sum(-1).tolist() == theirs.sum(-1).tolist(), f"layer {layer_idx}"
        else:
            assert mine.tolist() == theirs.tolist(), f"layer {layer_idx}"
    if twin is None or (wrapper == "ComposedPress-later" and model_name.endswith("eager")):
        return  # kvpress's own SnapKVPress there reads the attention weights of the whole prompt

    twin_cache, _, twin_kept = outcome(model, wrap(twin(RATIO)), input_ids, full, masking, matched)
    if matched:
        assert kept == twin_kept
    else:
        for ours_layer, twin_layer in zip(cache.layers, twin_cache.layers, strict=True):
            torch.testing.assert_close(ours_layer.keys, twin_layer.keys)
            torch.testing.assert_close(ours_layer.values, twin_layer.values)


# ------------------------------------------------------------------- a budget press under wrappers

RATIO_WRAPPERS = {
    **{
        name: wrap
        for name, wrap in PREFILL_WRAPPERS.items()
        if name not in ("DMSPress", "LUKVPress")
    },
    "DecodingPress": lambda press: kvpress.DecodingPress(
        press, compression_interval=4, target_size=16
    ),
    "CompressionRatioDecodingPress": lambda press: kvpress.CompressionRatioDecodingPress(press),
    "CAMPress": lambda press: kvpress.CAMPress(press, compression_interval=4, target_size=16),
}
RATIO_WRAPPERS.pop("PrefillDecodingPress")  # runs the press as it runs alone: budget kept


@pytest.mark.parametrize("wrapper", RATIO_WRAPPERS)
def test_a_budget_press_under_a_ratio_wrapper_is_refused_in_one_line(wrapper, tiny_models):
    """Refused when built (DecodingPress and CAMPress read the ratio) or first applied, never
    silently left uncompressed or given the wrapper's own size."""
    model = tiny_models["gqa-sdpa"]
    press = as_press(SnapKV(window=8), budget=16)
    with pytest.raises(ValueError) as error:
        prefill(model, RATIO_WRAPPERS[wrapper](press), prompts(model, 1))
    assert "keeps a token budget" in one_line(error.value)


def test_a_budget_press_keeps_its_budget_alone_and_under_prefill_decoding(tiny_models):
    model = tiny_models["gqa-sdpa"]
    input_ids = prompts(model, 3)
    for press in (
        as_press(CapKV(n_future=16), budget=16),
        kvpress.PrefillDecodingPress(prefilling_press=as_press(CapKV(n_future=16), budget=16)),
    ):
        cache = prefill(model, press, input_ids)
        assert [layer.keys.shape[2] for layer in cache.layers] == [16] * 4


# ------------------------------------------------------------ kvpress's edge conventions in ours


@pytest.mark.parametrize(
    ("method", "length", "ratio", "best"),
    [
        (SnapKV(window=32, pooling="avg"), 128, 0.8, range(103, 128)),  # the last 25
        (PyramidKV(window=8), 20, 0.8, range(17, 20)),
        (CapKV(n_future=16), 6, 0.9, [0]),  # the first sink
        (StreamingLLM(n_sink=4), 10, 0.9, [0]),
    ],
    ids=["snapkv-window32-ratio0.8-on-128", "pyramidkv", "capkv-ratio0.9-on-6", "streamingllm"],
)
def test_fewer_tokens_than_the_protected_keep_the_best_of_them(
    method, length, ratio, best, tiny_models
):
    """kvpress keeps max(1, int(T (1 - ratio))) tokens, some of its protected ones where that is
    fewer than them (its SnapKVPress: ties of top-k); ours keep as many, instead of raising:
    unscored ties go to the most recent window tokens and the earliest sinks."""
    model = tiny_models["gqa-sdpa"]
    input_ids = prompts(model, 3, length=length)
    full = DynamicCache()
    with torch.no_grad():
        run_with_cache(model.model, input_ids, full)
    _, lengths, kept = outcome(
        model, as_press(method, compression_ratio=ratio), input_ids, full, False
    )
    n_kept = max(1, int(length * (1 - ratio)))
    assert [n.tolist() for n in lengths] == [[[n_kept] * 2] * 3] * 4
    assert all(heads == set(best) for layer in kept for row in layer for heads in row)


def test_a_ratio_of_one_in_a_layer_keeps_nothing_there(tiny_models):
    model = tiny_models["mha-sdpa"]
    press = kvpress.PerLayerCompressionPress(
        as_press(H2O(window=8), compression_ratio=0.5), [0.1, 1, 0, 0.5]
    )
    cache = prefill(model, press, prompts(model, 3))
    assert [layer.keys.shape[2] for layer in cache.layers] == [43, 0, 48, 24]


def test_the_harness_still_refuses_a_ratio_below_the_window(tiny_models):
    """Inside presses kvpress's conventions; the harness's own budget checks stay as they are."""
    from capkv.engine.compression import evict

    model = tiny_models["gqa-sdpa"]
    with (
        pytest.raises(ValueError, match="fewer than the 32 tokens"),
        evict(model, SnapKV(), ratio=0.8),
    ):
        run_with_cache(model.model, prompts(model, 1, 128), DynamicCache())


# ------------------------------------------------------------------------- decoding-time wrappers

DECODING = dict(compression_interval=10, target_size=16, hidden_states_buffer_size=10)
DECODING_WRAPPERS = {
    "DecodingPress": lambda press: kvpress.DecodingPress(press, **DECODING),
    "DecodingPress-AdaKVPress": lambda press: kvpress.DecodingPress(
        kvpress.AdaKVPress(press), **DECODING
    ),
    "PrefillDecodingPress": lambda press: kvpress.PrefillDecodingPress(
        decoding_press=kvpress.DecodingPress(press, **DECODING)
    ),
    "CAMPress": lambda press: kvpress.CAMPress(press, merge_budget=4, **DECODING),
    "CompressionRatioDecodingPress": lambda press: kvpress.CompressionRatioDecodingPress(
        press, target_compression_ratio=0.5, compression_interval=10, hidden_states_buffer_size=10
    ),
}


@torch.no_grad()
def decode(model, press, input_ids, steps) -> DynamicCache:
    """A prefill of ``input_ids`` then one forward per token of ``steps`` (teacher-forced)."""
    cache = DynamicCache()
    length = input_ids.shape[1]
    with press(model):
        run_with_cache(model.model, input_ids, cache)
        for step in range(steps.shape[1]):
            position = torch.full((input_ids.shape[0], 1), length + step)
            run_with_cache(model.model, steps[:, step : step + 1], cache, position_ids=position)
    return cache


@pytest.mark.parametrize("model_name", ["gqa-sdpa", "gqa-eager", "mha-sdpa", "mha-eager"])
@pytest.mark.parametrize("wrapper", DECODING_WRAPPERS)
@pytest.mark.parametrize("method", METHODS)
def test_decoding_wrappers_keep_their_target_size_or_refuse(
    wrapper, method, model_name, tiny_models
):
    model = tiny_models[model_name]
    input_ids, steps = prompts(model, 3, 24), prompts(model, 3, 12, seed=6)
    wrap = DECODING_WRAPPERS[wrapper]
    ours = wrap(as_press(METHODS[method][0]()))
    if method == "pyramidkv":
        with pytest.raises(ValueError) as error:
            decode(model, ours, input_ids, steps)
        assert "per-layer schedule" in one_line(error.value)
        return
    try:
        reference = decode(model, wrap(kvpress.KnormPress()), input_ids, steps)
    except AssertionError:  # kvpress refuses it for its own presses too (eager under AdaKVPress)
        with pytest.raises(AssertionError):
            decode(model, ours, input_ids, steps)
        return
    cache = decode(model, ours, input_ids, steps)
    assert [layer.keys.shape[2] for layer in cache.layers] == [
        layer.keys.shape[2] for layer in reference.layers
    ]


@pytest.mark.parametrize("method", ["capkv", "snapkv", "h2o", "streamingllm"])
def test_buffered_decoding_states_are_scored_at_their_own_positions(method, tiny_models):
    """The tokens DecodingPress keeps with our press after 10 decoding steps are those the method
    keeps when the same last 10 tokens are recomputed from scratch in one forward."""
    from capkv.engine.layer import LayerPrefill

    model = tiny_models["gqa-sdpa"]
    input_ids, steps = prompts(model, 1, 24), prompts(model, 1, 10, seed=6)
    build = METHODS[method][0]
    cache = decode(model, DECODING_WRAPPERS["DecodingPress"](as_press(build())), input_ids, steps)
    states = capture_prefill(model, torch.cat([input_ids, steps], dim=1))
    for layer_idx, state in enumerate(states):
        buffered = LayerPrefill(
            module=state.module,
            rotary_emb=state.rotary_emb,
            num_layers=state.num_layers,
            hidden_states=state.hidden_states[:, -10:],
            keys=state.keys,
            values=state.values,
            cos=state.cos[:, -10:],
            sin=state.sin[:, -10:],
        )
        expected = build().kept_indices(buffered, Budget(tokens=16))[0]
        keys = cache.layers[layer_idx].keys[0]  # (H_kv, 16, d), from incremental decoding
        distance = torch.cdist(keys, state.keys[0])  # to every recomputed key
        assert distance.min(-1).values.max() < 1e-3  # incremental decoding's rounding
        kept = distance.argmin(-1).sort(-1).values
        assert torch.equal(kept, expected), f"layer {layer_idx}"


@pytest.mark.parametrize("method", ["capkv", "snapkv", "h2o", "streamingllm"])
def test_after_a_compressed_context_buffered_states_keep_their_positions(method, tiny_models):
    """As kvpress's pipeline decodes: the context compressed to 12 of its 24 tokens, then 10
    tokens at positions 24 to 33 (position_ids ahead of the cache's indices). The tokens kept at
    the decoding compression are those the method keeps when the same compressed context is
    followed by the 10 tokens in one forward."""
    from capkv.engine.hooks import forward_hooks, rotary_embedding
    from capkv.engine.layer import LayerPrefill

    model = tiny_models["gqa-sdpa"]
    input_ids, steps = prompts(model, 1, 24), prompts(model, 1, 10, seed=6)
    positions = torch.arange(24, 34).unsqueeze(0)
    build = METHODS[method][0]
    context = as_press(StreamingLLM(n_sink=4), compression_ratio=0.5)
    decoding = kvpress.DecodingPress(as_press(build()), **DECODING)
    press = kvpress.PrefillDecodingPress(prefilling_press=context, decoding_press=decoding)
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        run_with_cache(model.model, input_ids, cache)
        for step in range(10):
            token = slice(step, step + 1)
            run_with_cache(model.model, steps[:, token], cache, position_ids=positions[:, token])
    scratch, inputs = DynamicCache(), {}

    def keep_inputs(module, args, kwargs, output):
        inputs[module.layer_idx] = (kwargs["hidden_states"], *kwargs["position_embeddings"])

    with torch.no_grad():
        with context(model):
            run_with_cache(model.model, input_ids, scratch)
        with forward_hooks(attention_layers(model), post=keep_inputs):
            run_with_cache(model.model, steps, scratch, position_ids=positions)
    for layer_idx, module in enumerate(attention_layers(model)):
        hidden, cos, sin = inputs[layer_idx]
        layer = scratch.layers[layer_idx]
        state = LayerPrefill(
            module=module,
            rotary_emb=rotary_embedding(model),
            num_layers=len(attention_layers(model)),
            hidden_states=hidden,
            keys=layer.keys,
            values=layer.values,
            cos=cos,
            sin=sin,
            seen=34,
        )
        expected = build().kept_indices(state, Budget(tokens=16))[0]
        distance = torch.cdist(cache.layers[layer_idx].keys[0], layer.keys[0])
        assert distance.min(-1).values.max() < 1e-3  # incremental decoding's rounding
        assert torch.equal(distance.argmin(-1).sort(-1).values, expected), f"layer {layer_idx}"


def test_wrapped_presses_run_in_kvpress_pipeline(tiny_models):
    """kvpress's text-generation pipeline prefills and generates under a wrapper of ours (not
    AdaKVPress here: on this tiny model kvpress's masking finds no fake key for its own presses
    either)."""
    from transformers import pipeline

    from capkv.models import build_tiny_tokenizer

    model = tiny_models["gqa-sdpa"]
    pipe = pipeline(
        "kv-press-text-generation", model=model, tokenizer=build_tiny_tokenizer(), device="cpu"
    )
    context = "the quick brown fox jumps over the lazy dog " * 8
    for press in (
        kvpress.KeyRerotationPress(as_press(CapKV(n_future=16), compression_ratio=0.5)),
        kvpress.DecodingPress(as_press(H2O(window=4)), compression_interval=2, target_size=16),
    ):
        answer = pipe(context, question=" what jumps?", press=press, max_new_tokens=4)["answer"]
        assert isinstance(answer, str)
