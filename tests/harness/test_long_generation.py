"""Long generation under a bound and the streaming benchmark's measurement, on the tiny model."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from baselines import Full, StreamingLLM
from capkv import Budget, CapKV
from capkv.analysis.continuations import first_divergence, rouge_l
from capkv.engine.streaming import StreamSettings
from capkv.figures.long_generation import long_generation_figure
from capkv.harness.long_generation import (
    REQUESTS,
    LongGenerationSettings,
    essay_prompts,
    generate_bounded,
    run_comparison,
    write_tables,
)
from capkv.models import build_tiny_model
from capkv.results.store import read_rows

ROOT = Path(__file__).resolve().parents[2]


def script(name: str):
    """A module of scripts/ (not a package), imported from its file."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(seed=0)


SETTINGS = LongGenerationSettings("tiny-random", context_tokens=80, new_tokens=6, chunk=24,
                                  compress_every=4)  # fmt: skip


def test_the_comparison_runs_resumes_and_writes_its_tables_and_figure(tiny, tmp_path):
    model, tokenizer = tiny
    prompts = essay_prompts(tokenizer, 2, SETTINGS.context_tokens)
    assert [p.request for p in prompts] == list(REQUESTS)  # the requests alternate
    methods = {"full": Full(), "capkv": CapKV(), "streamingllm": StreamingLLM()}
    cells_run = []

    def progress(cells):
        cells_run.append(len(cells))
        return cells

    rows = run_comparison(
        model, tokenizer, prompts, methods, [16], SETTINGS, tmp_path, progress=progress
    )
    assert cells_run == [2 * 3]  # per prompt: the full cache, then each method at each budget
    assert len(read_rows(tmp_path / "long_generation_rows.jsonl")) == 6
    comparison, summary = write_tables(rows, SETTINGS, tmp_path, "python scripts/x.py")
    full = comparison[comparison["method"] == "full"]
    assert (full["identical_tokens"] == 6).all() and (full["rouge_l"] == 1.0).all()
    bounded = comparison[comparison["method"] != "full"]
    assert (bounded["generated"] == 6).all()
    assert (bounded["peak_tokens_max_layer"] <= 16 + 24).all()  # budget + max(chunk, K)
    assert (bounded["peak_tokens_max_layer"] == bounded["bound"]).all()
    assert bounded["rouge_l"].between(0, 1).all()
    assert list(summary["method"]) == ["full", "capkv", "streamingllm"]
    markdown = (tmp_path / "long_generation.md").read_text()
    assert "python scripts/x.py" in markdown and "| full | full | 2 | 6.0 |" in markdown
    assert (tmp_path / "long_generation.csv").read_text().count("\n") == 7
    figure = long_generation_figure(summary, "tiny")
    figure.savefig(tmp_path / "figure.png")

    again = run_comparison(
        model, tokenizer, prompts, methods, [16], SETTINGS, tmp_path, progress=progress
    )
    assert cells_run[-1] == 0 and again == rows  # nothing left to run
    other = LongGenerationSettings("tiny-random", context_tokens=80, new_tokens=7)
    with pytest.raises(ValueError, match="other settings .differs in new_tokens, chunk, "):
        run_comparison(model, tokenizer, prompts, methods, [16], other, tmp_path)
    with pytest.raises(ValueError, match="made with CapKV"):
        changed = {**methods, "capkv": CapKV(tau=1.0)}
        run_comparison(model, tokenizer, prompts, changed, [16], SETTINGS, tmp_path)
    with pytest.raises(ValueError, match="prompt addiction-continue made from other tokens"):
        shorter = [replace(prompts[0], input_ids=prompts[0].input_ids[:, 1:]), prompts[1]]
        run_comparison(model, tokenizer, shorter, methods, [16], SETTINGS, tmp_path)


@pytest.mark.parametrize("compress_every", [None, 4])
@pytest.mark.parametrize("method", [CapKV(), StreamingLLM()], ids=["capkv", "streamingllm"])
def test_a_bound_as_long_as_the_text_continues_exactly_as_the_full_cache(
    tiny, method, compress_every
):
    model, tokenizer = tiny
    ids = essay_prompts(tokenizer, 1, 80)[0].input_ids
    settings = StreamSettings(chunk=24, compress_every=compress_every)
    full = generate_bounded(model, ids, Full(), None, settings, 6)
    text = Budget(tokens=ids.shape[1] + 6)
    bounded = generate_bounded(model, ids, method, text, settings, 6)
    assert bounded.final_per_layer == full.final_per_layer
    assert first_divergence(full.tokens, bounded.tokens) == 6
    assert rouge_l(full.tokens, bounded.tokens) == 1.0


def test_generation_past_the_models_positions_is_refused(tiny):
    model, _ = tiny
    ids = torch.ones(1, 4090, dtype=torch.long)
    with pytest.raises(ValueError, match="position limit of 4096"):
        generate_bounded(model, ids, CapKV(), Budget(tokens=64), StreamSettings(chunk=512), 8)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--new-tokens", "0"], "new_tokens must be a positive whole number of tokens, got 0."),
        (["--chunk", "0"], "chunk must be at least 1 token, got 0."),
        (["--methods", "capkvv"], "unknown method 'capkvv'; choose one of: "),
        (["--budgets", "0"], "budget must be a positive number of tokens, got 0."),
        (["--budgets", "8", "--methods", "snapkv"], "SnapKV always keeps 32 tokens"),
        (["--prompts", "60"], "essays hold at least 1536 tokens, so 60 prompts cannot be made"),
    ],
)
def test_the_long_generation_script_refuses_bad_input_in_one_line(arguments, message, tmp_path):
    main = script("long_generation").main
    with pytest.raises(SystemExit) as stopped:
        main(["--model", "tiny-random", "--results", str(tmp_path), *arguments])
    text = str(stopped.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text


def test_the_long_generation_script_writes_the_rows_tables_and_figure(tmp_path):
    arguments = ["--model", "tiny-random", "--prompts", "1", "--context-tokens", "60"]
    arguments += ["--new-tokens", "4", "--chunk", "40", "--methods", "snapkv", "--budgets", "48"]
    script("long_generation").main(
        [*arguments, "--results", str(tmp_path), "--plots", str(tmp_path)]
    )
    assert len(read_rows(tmp_path / "long_generation_rows.jsonl")) == 2
    assert "| snapkv | 48 | 1 |" in (tmp_path / "long_generation.md").read_text()
    assert (tmp_path / "tiny-random_long_generation.png").stat().st_size > 0


def test_the_benchmark_measures_the_peak_cache_in_bytes_against_the_full_cache(tiny):
    bench = script("bench_streaming")
    model, _ = tiny
    ids = torch.randint(
        3, model.config.vocab_size, (1, 100), generator=torch.Generator().manual_seed(0)
    )
    per_token = bench.bytes_per_token(model)
    assert per_token == 2 * 16 * 2 * 4  # KV heads x head_dim x (keys, values) x float32
    layers = model.config.num_hidden_layers
    full = bench.measure(model, ids, Full(), None, StreamSettings(), 5)
    assert full["generated"] == 5
    assert full["prefill_peak_bytes"] == 100 * layers * per_token
    assert full["peak_bytes"] == (100 + 4) * layers * per_token  # the last token is not fed back
    settings = StreamSettings(chunk=24, compress_every=4)
    bounded = bench.measure(model, ids, CapKV(), 16, settings, 5)
    assert bounded["peak_tokens"] == 16 + 24
    assert bounded["peak_bytes"] == (16 + 24) * layers * per_token
    assert bounded["peak_bytes"] / full["prefill_peak_bytes"] <= (16 + 24) / 100
    assert min(bounded["prefill_seconds"], bounded["decode_wall_seconds"]) > 0
