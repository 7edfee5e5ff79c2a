"""task=perplexity on the tiny random model: texts of the requested length, perplexity equal to a
plain forward's where nothing is evicted, a bounded read, resume, tables and figure from a run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from baselines import Full, StreamingLLM
from capkv import Budget
from capkv.engine.streaming import StreamSettings
from capkv.figures.cli import main as figures_main
from capkv.harness.runner import Cell, run_cell
from capkv.models import build_tiny_model
from capkv.results.store import EXAMPLES, METRICS, finished_rows, run_directory, run_identity
from capkv.tasks.haystack import essay_files
from capkv.tasks.perplexity import PerplexityTask
from capkv.tasks.prompting import tokenize_prompt

ROOT = Path(__file__).resolve().parents[2]
TASK_CONFIG = {
    "_target_": "capkv.tasks.perplexity.PerplexityTask",
    "length": 120,
    "num_texts": 2,
    "bucket": 50,
}


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model()


def direct_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """NLL of tokens 1..T-1 from one plain forward over the whole text (no cache games)."""
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    return -torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)


def test_the_texts_have_the_requested_length_and_start_at_different_essays(tiny):
    _, tokenizer = tiny
    examples = list(PerplexityTask(length=150, num_texts=3).examples(tokenizer, 4096))
    assert [tokenize_prompt(tokenizer, e).length for e in examples] == [150, 150, 150]
    firsts = [e.metadata["first_essay"] for e in examples]
    assert len(set(firsts)) == 3 and firsts[0] == essay_files()[0].stem
    assert len({e.context[:40] for e in examples}) == 3
    # length=null: as long as the model allows (a reading task gets every position)
    (whole,) = PerplexityTask(num_texts=1).examples(tokenizer, 300)
    assert tokenize_prompt(tokenizer, whole).length == 300


@pytest.mark.parametrize("chunk", [200, 48])
def test_the_full_cache_scores_every_token_as_a_plain_forward(tiny, chunk):
    model, tokenizer = tiny
    task = PerplexityTask(length=130, num_texts=1, bucket=64)
    (example,) = task.examples(tokenizer, 4096)
    fields, record = task.evaluate(
        model, tokenizer, example, Full(), None, StreamSettings(chunk=chunk)
    )
    nll = direct_nll(model, tokenize_prompt(tokenizer, example).context_ids)
    assert fields["scored_tokens"] == 129
    assert fields["nll_sum"] == pytest.approx(nll.double().sum().item(), rel=1e-5)
    assert fields["scores"]["perplexity"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    assert list(fields["scores"]) == [
        "perplexity",
        "perplexity 0-64",
        "perplexity 64-128",
        "perplexity 128-130",
    ]
    assert fields["bucket_tokens"] == [63, 64, 2]  # position 0 is read, not scored
    assert fields["scores"]["perplexity 128-130"] == pytest.approx(
        math.exp(nll[127:].mean().item()), rel=1e-5
    )
    assert math.fsum(fields["bucket_nll_sums"]) == pytest.approx(fields["nll_sum"])
    assert record.peak_per_layer == [130] * len(record.peak_per_layer)


def test_a_bounded_read_holds_at_most_budget_plus_chunk_tokens(tiny):
    model, tokenizer = tiny
    task = PerplexityTask(length=130, num_texts=1, bucket=64)
    (example,) = task.examples(tokenizer, 4096)
    budget = Budget(tokens=32)
    fields, record = task.evaluate(
        model, tokenizer, example, StreamingLLM(), budget, StreamSettings(chunk=16)
    )
    assert max(record.peak_per_layer) <= 32 + 16
    assert fields["scored_tokens"] == 129 and math.isfinite(fields["scores"]["perplexity"])
    assert 0.0 < fields["diagnostics"]["capacity_fraction"] < 1.0  # evicted: some capacity lost
    full, _ = task.evaluate(model, tokenizer, example, Full(), None, StreamSettings(chunk=16))
    assert "diagnostics" not in full  # the full cache keeps everything: nothing to measure


def test_compress_every_is_refused_in_one_sentence(tiny):
    model, tokenizer = tiny
    task = PerplexityTask(length=20, num_texts=1)
    (example,) = task.examples(tokenizer, 4096)
    with pytest.raises(ValueError, match="task=perplexity generates nothing; drop compress_every"):
        task.evaluate(model, tokenizer, example, Full(), None, StreamSettings(compress_every=8))


@pytest.mark.parametrize(
    ("settings", "limit", "message"),
    [
        ({"length": 1}, 4096, "task.length=1 leaves no token to score"),
        ({"bucket": 0}, 4096, "task.bucket=0 is not a number of token positions"),
        ({"num_texts": 0}, 4096, "task.num_texts=0 reads nothing"),
        ({"length": 5000}, 4096, "task.length=5000 is longer than the model's 4096 positions"),
        ({"num_texts": 500}, 4096, "task.num_texts=500 is more than the"),
    ],
)
def test_bad_settings_are_refused_in_one_sentence(tiny, settings, limit, message):
    _, tokenizer = tiny
    with pytest.raises(ValueError, match=message) as refused:
        list(PerplexityTask(**settings).examples(tokenizer, limit))
    assert "\n" not in str(refused.value)


def test_a_run_resumes_at_the_text_it_lacks(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    task = PerplexityTask(length=120, num_texts=2, bucket=50)
    identity = run_identity("tiny", "perplexity", "full", "", None, "query_aware")
    config = {"model": {"name": "tiny"}, "method": {"_target_": "baselines.Full"}}
    config["task"] = TASK_CONFIG

    def cell() -> Cell:
        return Cell(Full(), None, tmp_path, identity, config=config)

    run_cell(model, tokenizer, task, cell(), "query_aware")
    reference = finished_rows(tmp_path)
    lines = (tmp_path / EXAMPLES).read_text().splitlines()
    (tmp_path / EXAMPLES).write_text(lines[0] + "\n")  # the second text was lost
    calls = []
    original = task.evaluate
    monkeypatch.setattr(task, "evaluate", lambda *a: calls.append(1) or original(*a))
    run_cell(model, tokenizer, task, cell(), "query_aware")
    resumed = finished_rows(tmp_path)
    assert len(calls) == 1 and resumed[0] == reference[0]
    assert resumed[1]["nll_sum"] == pytest.approx(reference[1]["nll_sum"], rel=1e-6)
    metrics = json.loads((tmp_path / METRICS).read_text())
    pooled = math.exp(sum(r["nll_sum"] for r in resumed) / sum(r["scored_tokens"] for r in resumed))
    assert metrics["benchmark"] == "perplexity"
    assert metrics["scores"]["perplexity"] == pytest.approx(pooled)  # pooled, not x 100


def test_a_sweep_writes_the_perplexity_table_and_figure(tmp_path):
    command = [
        sys.executable,
        str(ROOT / "run.py"),
        "model=tiny-random",
        "task=perplexity",
        "task.length=96",
        "task.num_texts=2",
        "task.bucket=32",
        "methods=[streamingllm,full]",
        "budgets=[24]",
        "chunk=16",
        "results_dir=results",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = tmp_path / "results"
    for label, budget in [("streamingllm-chunk16", "budget24"), ("full-chunk16", "full")]:
        cell = run_directory(results, "tiny-random", "perplexity", label, budget, "query_aware")
        assert len(finished_rows(cell)) == 2
    table = pd.read_csv(results / "perplexity.csv")
    whole = table[table["positions"] == "all"].set_index("method")
    assert whole.loc["full", "ratio_to_full"] == 1.0
    assert whole.loc["streamingllm", "peak_tokens"] <= 24 + 16
    assert whole.loc["streamingllm", "low"] <= whole.loc["streamingllm", "perplexity"]
    assert 0 < whole.loc["streamingllm", "capacity_fraction"] < 1
    assert math.isnan(whole.loc["full", "capacity_fraction"])
    assert "capacity kept" in (results / "perplexity.md").read_text()
    assert list(table.loc[table["method"] == "full", "positions"]) == [
        "all",
        "0-32",
        "32-64",
        "64-96",
    ]
    assert "perplexity" not in pd.read_csv(results / "main_table.csv").columns
    assert pd.read_csv(results / "paired.csv").empty
    plots = tmp_path / "plots"
    figures_main(["--results", str(results), "--plots", str(plots)])
    for name in ("perplexity_by_position", "perplexity_vs_capacity"):
        stem = f"tiny-random_perplexity_query_aware_{name}"
        assert (plots / f"{stem}.png").stat().st_size > 0 and (plots / f"{stem}.pdf").exists()
    assert not list(plots.glob("*_perplexity_capacity.png"))  # not the 0-100 capacity figure
