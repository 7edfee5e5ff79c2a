"""run.py end to end on the tiny random model: configs, smoke runs, resume, sweeps, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from capkv.engine.method import EvictionMethod
from capkv.harness.cli import CONF_DIR, group_options
from capkv.harness.runner import Cell, run_cell
from capkv.interop import kvpress_problem
from capkv.models import build_tiny_model
from capkv.results.store import EXAMPLES, METRICS, finished_rows, run_directory
from capkv.tasks.needle import NeedleTask

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "longbench"
TINY_NEEDLE = ["model=tiny-random", "task.context_lengths=[200,400]", "task.depths=[0,100]"]


def run(tmp_path: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """python run.py <overrides> with the results and Hydra outputs under tmp_path."""
    command = [sys.executable, str(ROOT / "run.py"), *overrides, "results_dir=results"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if "error" in line.lower()]


@pytest.mark.parametrize("method", group_options("method"))
def test_every_method_config_composes_and_instantiates(method):
    # method=kvpress needs a press, and kvpress (tests/interop/test_kvpress_*.py cover it)
    overrides = [f"method={method}"] + (["method.press=TOVAPress"] if method == "kvpress" else [])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    if method == "kvpress" and kvpress_problem() is not None:
        with pytest.raises(Exception, match=r"install it with pip install -e '\.\[kvpress\]'"):
            instantiate(cfg.method)
        return
    assert isinstance(instantiate(cfg.method), EvictionMethod)


@pytest.mark.parametrize("task", group_options("task"))
def test_every_task_config_composes_and_instantiates(task):
    overrides = [f"task={task}"]
    if task.startswith("longbench"):
        overrides.append(f"task.data_dir={FIXTURES}")
    if task == "custom":
        overrides.append(f"task.path={FIXTURES / 'qasper.jsonl'}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    assert instantiate(cfg.task).name


@pytest.mark.parametrize("model", group_options("model"))
def test_every_model_config_composes(model):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}"])
    assert cfg.model.name


def test_smoke_run_needle_and_longbench(tmp_path):
    result = run(tmp_path, *TINY_NEEDLE, "method=capkv", "budget=128")
    assert "| average |" in result.stdout
    needle_dir = run_directory(
        tmp_path / "results", "tiny-random", "needle", "capkv", "budget128", "query_aware"
    )
    rows = finished_rows(needle_dir)
    assert len(rows) == 4
    assert all(len(r["kept_tokens_per_layer"]) == 4 for r in rows)
    assert all(max(r["kept_tokens_per_layer"]) == 128 for r in rows)
    assert set(rows[0]["scores"]) == {"exact", "graded"}
    stored = OmegaConf.load(needle_dir / "config.yaml")
    assert stored.versions == {"transformers": transformers.__version__, "torch": torch.__version__}
    metrics = json.loads((needle_dir / METRICS).read_text())
    assert metrics["n_examples"] == 4
    assert (metrics["benchmark"], metrics["headline"], metrics["families"]) == (
        "needle",
        "exact",
        {},
    )

    run(
        tmp_path,
        "model=tiny-random",
        "task=longbench",
        f"task.data_dir={FIXTURES}",
        "task.datasets=[qasper,trec,passage_count]",
        "method=snapkv",
        "ratio=0.5",
        "protocol=context_only",
    )
    longbench_dir = run_directory(
        tmp_path / "results", "tiny-random", "longbench", "snapkv", "ratio0.5", "context_only"
    )
    metrics = json.loads((longbench_dir / METRICS).read_text())
    assert set(metrics["subtasks"]) == {"qasper", "trec", "passage_count"}
    assert (metrics["benchmark"], metrics["headline"]) == ("longbench", "score")
    assert metrics["families"] == {
        "qasper": "Single-doc QA",
        "trec": "Few-shot",
        "passage_count": "Synthetic",
    }
    for name in ("scores.csv", "scores.md", "main_table.csv", "needle.csv"):
        assert (tmp_path / "results" / name).stat().st_size > 0


def test_multirun_sweep_writes_one_directory_per_cell(tmp_path):
    run(tmp_path, "-m", *TINY_NEEDLE, "method=capkv,streamingllm", "budget=64,128")
    for method in ("capkv", "streamingllm"):
        for budget in ("budget64", "budget128"):
            path = run_directory(
                tmp_path / "results", "tiny-random", "needle", method, budget, "query_aware"
            )
            assert len(finished_rows(path)) == 4


def test_a_killed_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    model, tokenizer = build_tiny_model()
    task = NeedleTask(context_lengths=[200, 400], depths=[0, 50, 100])
    from baselines import SnapKV
    from capkv import Budget
    from capkv.harness import runner

    run_dir = tmp_path / "cell"
    identity = {
        "model": "tiny",
        "task": "needle",
        "method": "snapkv",
        "budget": "budget64",
        "protocol": "query_aware",
    }
    args = (model, tokenizer, task, Cell(SnapKV(window=8), Budget(tokens=64), run_dir, identity))
    reference = run_cell(*args, "query_aware")
    reference_rows = finished_rows(run_dir)

    # Simulate a kill in the middle of the fourth example, after a torn write.
    lines = (run_dir / EXAMPLES).read_text().splitlines(keepends=True)
    (run_dir / EXAMPLES).write_text("".join(lines[:3]) + lines[3][:25])
    (run_dir / METRICS).unlink()
    calls = []
    original = runner.generate_one
    monkeypatch.setattr(runner, "generate_one", lambda *a: calls.append(1) or original(*a))
    resumed = run_cell(*args, "query_aware")
    assert len(calls) == 3
    assert finished_rows(run_dir) == [
        {**row, "seconds": new["seconds"]}
        for row, new in zip(reference_rows, finished_rows(run_dir), strict=True)
    ]
    assert resumed["scores"] == reference["scores"]

    # An interrupt keeps what was finished, with metrics for it.
    def interrupt(*a):
        raise KeyboardInterrupt

    (run_dir / EXAMPLES).write_text("".join(lines[:2]))
    monkeypatch.setattr(runner, "generate_one", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_cell(*args, "query_aware")
    assert json.loads((run_dir / METRICS).read_text())["n_examples"] == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=capkvv"], "unknown method 'capkvv'; choose one of: capkv,"),
        (["model=gpt5"], "unknown model 'gpt5'; choose one of:"),
        (["task=needles"], "unknown task 'needles'; choose one of:"),
        (["model=tiny-random", "budget=64", "ratio=0.5"], "pass only one of them"),
        (["model=tiny-random", "ratio=1.5"], "ratio must lie in [0, 1)"),
        (["model=tiny-random", "method=snapkv", "budget=16"], "budget above 32"),
        (["model=tiny-random", "task=longbench", "task.data_dir=/nowhere"], "/nowhere"),
        (
            [
                "model=tiny-random",
                "task=longbench",
                f"task.data_dir={FIXTURES}",
                "task.datasets=[qaspr]",
            ],
            "qaspr",
        ),
        (["model=tiny-random", "task.context_lengths=[9000]"], "9000"),
        (["model=tiny-random", "protocol=question_first"], "protocol"),
    ],
)
def test_bad_input_gives_one_error_line_and_writes_nothing(tmp_path, overrides, message):
    result = run(tmp_path, *overrides, check=False)
    assert result.returncode != 0
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr[-2000:]
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "results").exists()
