"""task=long_generation on the tiny random model: the prompts, bad settings refused in one
sentence, a cell's rows, resume, rows of other settings refused by the runner, and a sweep's
tables and figure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from capkv import Budget, CapKV
from capkv.engine.streaming import StreamSettings
from capkv.figures.cli import main as figures_main
from capkv.harness.runner import Cell, run_cell
from capkv.models import build_tiny_model
from capkv.results.store import EXAMPLES, finished_rows, run_directory, run_identity
from capkv.tasks.long_generation import REQUESTS, LongGenerationTask, digest
from capkv.tasks.prompting import tokenize_prompt

ROOT = Path(__file__).resolve().parents[2]
TASK = LongGenerationTask(prompts=2, context_tokens=80, new_tokens=6)
TASK_CONFIG = {
    "_target_": "capkv.tasks.long_generation.LongGenerationTask",
    "name": "long_generation",
    "prompts": 2,
    "context_tokens": 80,
    "new_tokens": 6,
}
STREAM = StreamSettings(chunk=24, compress_every=4)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(seed=0)


def test_the_prompts_are_essay_openings_with_alternating_requests(tiny):
    _, tokenizer = tiny
    examples = list(TASK.examples(tokenizer, 4096))
    assert [e.metadata["request"] for e in examples] == list(REQUESTS)
    assert [e.example_id for e in examples] == [
        f"{e.metadata['essay']}-{e.metadata['request']}" for e in examples
    ]
    assert len({e.metadata["essay"] for e in examples}) == 2
    for example in examples:
        assert example.max_new_tokens == 6
        assert example.question.strip() == REQUESTS[example.metadata["request"]]
        excerpt = tokenizer(example.context, add_special_tokens=False)["input_ids"]
        assert 0 < len(excerpt) <= 80


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"new_tokens": 0}, "task.new_tokens=0 is not a positive whole number"),
        ({"prompts": 0}, "task.prompts=0 is not a positive whole number"),
        ({"context_tokens": 1.5}, "task.context_tokens=1.5 is not a positive whole number"),
    ],
)
def test_bad_settings_are_refused_in_one_sentence(settings, message):
    with pytest.raises(ValueError, match=message) as refused:
        LongGenerationTask(**settings)
    assert "\n" not in str(refused.value)


def test_more_prompts_than_the_essays_hold_are_refused_in_one_sentence(tiny):
    _, tokenizer = tiny
    with pytest.raises(ValueError, match="so task.prompts=60 prompts cannot be made") as refused:
        list(LongGenerationTask(prompts=60).examples(tokenizer, 4096))
    assert "\n" not in str(refused.value)


def test_a_continuation_is_exactly_new_tokens_under_the_bound(tiny):
    model, tokenizer = tiny
    example = next(iter(TASK.examples(tokenizer, 4096)))
    fields, record = TASK.evaluate(model, tokenizer, example, CapKV(), Budget(tokens=16), STREAM)
    assert len(fields["tokens"]) == 6 and fields["scores"] == {}
    assert fields["prompt_digest"] == digest(tokenize_prompt(tokenizer, example).full())
    assert max(record.peak_per_layer) == 16 + 24  # budget + max(chunk, compress_every)
    assert fields["prediction"] == tokenizer.decode(fields["tokens"], skip_special_tokens=True)


def cell(run_dir: Path, method, budget, config: dict) -> Cell:
    name = "full" if budget is None else "capkv"
    identity = run_identity("tiny", "long_generation", name, "", budget, "query_aware")
    return Cell(method, budget, run_dir, identity, config=config, stream=STREAM)


def test_a_cell_resumes_and_refuses_rows_of_other_settings(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    config = {
        "model": {"name": "tiny"},
        "method": {"_target_": "capkv.CapKV"},
        "task": TASK_CONFIG,
        "chunk": 24,
        "compress_every": 4,
    }
    budget = Budget(tokens=16)
    run_cell(model, tokenizer, TASK, cell(tmp_path, CapKV(), budget, config), "query_aware")
    reference = finished_rows(tmp_path)
    assert len(reference) == 2 and all(len(row["tokens"]) == 6 for row in reference)
    lines = (tmp_path / EXAMPLES).read_text().splitlines()
    (tmp_path / EXAMPLES).write_text(lines[0] + "\n")  # the second prompt's row was lost
    calls = []
    original = TASK.evaluate
    monkeypatch.setattr(TASK, "evaluate", lambda *a: calls.append(1) or original(*a))
    run_cell(model, tokenizer, TASK, cell(tmp_path, CapKV(), budget, config), "query_aware")
    resumed = finished_rows(tmp_path)
    assert len(calls) == 1 and resumed[0] == reference[0]
    assert resumed[1]["tokens"] == reference[1]["tokens"]
    run_cell(model, tokenizer, TASK, cell(tmp_path, CapKV(), budget, config), "query_aware")
    assert len(calls) == 1  # nothing left to run
    longer = {**config, "task": {**TASK_CONFIG, "new_tokens": 7}}
    with pytest.raises(ValueError, match=r"other settings \(differs in task.new_tokens\)"):
        run_cell(model, tokenizer, TASK, cell(tmp_path, CapKV(), budget, longer), "query_aware")
    changed = {**config, "method": {"_target_": "capkv.CapKV", "tau": 1.0}}
    with pytest.raises(ValueError, match=r"other settings \(differs in method.tau\)"):
        run_cell(model, tokenizer, TASK, cell(tmp_path, CapKV(), budget, changed), "query_aware")
    unbounded = {**config, "compress_every": None}
    with pytest.raises(ValueError, match=r"other settings \(differs in compress_every\)"):
        run_cell(model, tokenizer, TASK, cell(tmp_path, CapKV(), budget, unbounded), "query_aware")


def run(tmp_path: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(ROOT / "run.py"),
        "experiment=long_generation",
        "model=tiny-random",
        "task.prompts=2",
        "task.context_tokens=80",
        "task.new_tokens=6",
        "methods=[full,capkv,streamingllm]",
        "budgets=[16]",
        "chunk=24",
        "compress_every=4",
        "results_dir=results",
    ]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_a_sweep_writes_rows_tables_and_figure_and_resumes(tmp_path):
    result = run(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = tmp_path / "results"
    cells = [("full-chunk24-every4", "full")]
    cells += [(f"{m}-chunk24-every4", "budget16") for m in ("capkv", "streamingllm")]
    for label, budget in cells:
        folder = run_directory(
            results, "tiny-random", "long_generation", label, budget, "query_aware"
        )
        assert len(finished_rows(folder)) == 2
        assert (folder / "config.yaml").exists() and (folder / "metrics.json").exists()
    comparison = pd.read_csv(results / "long_generation.csv")
    assert len(comparison) == 2 * 3  # per prompt: the full cache, then each method
    full = comparison[comparison["method"] == "full"]
    assert (full["identical_tokens"] == 6).all() and (full["rouge_l"] == 1.0).all()
    bounded = comparison[comparison["method"] != "full"]
    assert (bounded["generated"] == 6).all()
    assert (bounded["peak_tokens_max_layer"] <= 16 + 24).all()  # budget + max(chunk, K)
    assert (bounded["peak_tokens_max_layer"] == bounded["bound"]).all()
    assert bounded["rouge_l"].between(0, 1).all()
    assert list(dict.fromkeys(comparison["method"])) == ["full", "capkv", "streamingllm"]
    markdown = (results / "long_generation.md").read_text()
    assert "| tiny-random | full | chunk24-every4 | full | 2 | 6.0 | 6 | 1.000 |  |" in markdown
    assert "| tiny-random | capkv | chunk24-every4 | 16 | 2 |" in markdown
    assert "long_generation" not in pd.read_csv(results / "main_table.csv").columns
    assert pd.read_csv(results / "paired.csv").empty
    plots = tmp_path / "plots"
    figures_main(["--results", str(results), "--plots", str(plots)])
    stem = plots / "tiny-random_long_generation_query_aware_chunk24-every4"
    assert stem.with_suffix(".png").stat().st_size > 0 and stem.with_suffix(".pdf").exists()
    rows = (results / "runs").rglob(EXAMPLES)
    before = {path: path.read_text() for path in rows}
    again = run(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "/2 [" not in again.stderr and again.stderr.count(": 0example [") >= 3  # none to go
    assert {path: path.read_text() for path in before} == before  # nothing ran again
