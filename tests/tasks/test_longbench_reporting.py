"""LongBench and LongBench-E from a fixture run to tables and figures: what `make tables figures`
draws for them (the committed CPU results have no LongBench column; a run on the fixtures stands
in for one on the data)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from capkv.figures.cli import draw_all
from capkv.figures.curves import curve_jobs
from capkv.figures.data import load_length_buckets, load_tables
from capkv.figures.length_buckets import length_figure, length_jobs

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "longbench"
GRID = ["model=tiny-random", "methods=[full,snapkv,streamingllm]", "budgets=[64]"]
STANDARD = ["task=longbench", "task.datasets=[qasper,hotpotqa,trec,lcc]"]
E = ["task=longbench_e", "task.datasets=[qasper,lcc]"]


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A sweep of LongBench and one of LongBench-E on the fixtures, then the figures."""
    tmp = tmp_path_factory.mktemp("longbench_run")
    for task in (STANDARD, E):
        command = [sys.executable, str(ROOT / "run.py"), *GRID, *task]
        command += [f"task.data_dir={FIXTURES}", f"results_dir={tmp / 'results'}"]
        result = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "results", draw_all(tmp / "results", tmp / "plots")


def test_the_main_table_has_a_column_per_family_of_each_variant(fixture_run) -> None:
    results, _ = fixture_run
    columns = list(pd.read_csv(results / "main_table.csv").columns)
    named = [
        c
        for c in columns
        if c.startswith("longbench") and c.split()[-1] not in ("low", "high", "n")
    ]
    assert named == [
        "longbench: Single-doc QA",
        "longbench: Multi-doc QA",
        "longbench: Few-shot",
        "longbench: Code",
        "longbench",
        "longbench_e: Single-doc QA",
        "longbench_e: Code",
        "longbench_e",
    ]


@pytest.mark.parametrize(
    ("task", "panels"),
    [
        ("longbench", ["Single-doc QA", "Multi-doc QA", "Few-shot", "Code"]),
        ("longbench_e", ["Single-doc QA", "Code"]),
    ],
)
def test_each_variant_gets_its_family_panels_and_task_table(fixture_run, task, panels) -> None:
    results, written = fixture_run
    names = {path.name for path in written}
    stem = f"tiny-random_{task}_query_aware"
    assert {f"{stem}_score_vs_tokens.png", f"{stem}_table.csv", f"{stem}_table.md"} <= names
    _, _, intervals = load_tables(results)
    (job,) = [
        job
        for job in curve_jobs(intervals, results.parent / "plots")
        if job[0].name == f"{stem}_score_vs_tokens"
    ]
    _, draw, args = job
    figure = draw(*args)
    titles = [ax.get_title() for ax in figure.axes if ax.axison]
    assert titles == [*panels, "Average over subtasks"]
    for ax in figure.axes:
        if ax.axison:
            labels = {line.get_label() for line in ax.get_lines()}
            assert {"SnapKV", "StreamingLLM"} <= labels
    table = pd.read_csv(results.parent / "plots" / f"{stem}_table.csv")
    assert list(table["method"]) == ["full", "snapkv", "streamingllm"]


def test_longbench_e_scores_per_length_bucket_are_tabled(fixture_run) -> None:
    results, _ = fixture_run
    table = pd.read_csv(results / "longbench_e.csv")
    assert set(table["task"]) == {"longbench_e"}
    runs = table.groupby(["method", "budget"], sort=False)
    assert list(runs.groups) == [
        ("full", "full"),
        ("snapkv", "budget64"),
        ("streamingllm", "budget64"),
    ]
    for _, rows in runs:
        assert list(zip(rows["subtask"], rows["bucket"], rows["n"], strict=True)) == [
            (subtask, bucket, n)
            for subtask, n in (("qasper", 1), ("lcc", 1), ("average", 2))
            for bucket in ("0-4k", "4-8k", "8k+")
        ]
        average = rows[rows["subtask"] == "average"].set_index("bucket")["score"]
        datasets = rows[rows["subtask"] != "average"].groupby("bucket")["score"].mean()
        assert average.to_dict() == pytest.approx(datasets.to_dict())
    text = (results / "longbench_e.md").read_text()
    assert (
        "| model | task | method | variant | budget | protocol | subtask | 0-4k | 4-8k | 8k+ |"
        in text
    )
    assert not (results / "perplexity.csv").exists()


def test_longbench_e_gets_a_score_against_length_figure(fixture_run) -> None:
    results, written = fixture_run
    assert "tiny-random_longbench_e_query_aware_score_vs_length.png" in {p.name for p in written}
    (job,) = length_jobs(load_length_buckets(results), results.parent / "plots")
    figure = job[1](*job[2])
    (panel,) = [ax for ax in figure.axes if ax.axison]
    assert panel.get_title() == "64 tokens/head"
    assert [t.get_text() for t in panel.get_xticklabels()] == ["0-4k", "4-8k", "8k+"]
    assert [line.get_label() for line in panel.get_lines()] == [
        "Full cache",
        "SnapKV",
        "StreamingLLM",
    ]


def test_the_length_figure_draws_each_method_s_average_per_bucket() -> None:
    def rows(method: str, budget: str, tokens: float, scores: list[float]) -> list[dict]:
        return [
            {"model": "m", "task": "longbench_e", "method": method, "variant": "", "budget": budget,
             "budget_tokens": tokens, "ratio": float("nan"), "protocol": "query_aware",
             "subtask": "average", "bucket": bucket, "score": score, "n": 3}
            for bucket, score in zip(["8k+", "0-4k", "4-8k"], scores, strict=True)
        ]  # fmt: skip

    nan = float("nan")
    table = pd.DataFrame(
        rows("full", "full", nan, [30.0, 50.0, 40.0])
        + rows("snapkv", "budget128", 128.0, [10.0, 40.0, 20.0])
        + rows("capkv", "budget64", 64.0, [15.0, 45.0, 25.0])
        + rows("capkv", "budget128", 128.0, [20.0, 48.0, 30.0])
    )
    figure = length_figure(table, "title")
    panels = [ax for ax in figure.axes if ax.axison]
    assert [ax.get_title() for ax in panels] == ["64 tokens/head", "128 tokens/head"]
    drawn = {
        (ax.get_title(), line.get_label()): list(line.get_ydata())
        for ax in panels
        for line in ax.get_lines()
    }
    assert drawn == {
        ("64 tokens/head", "Full cache"): [50.0, 40.0, 30.0],
        ("64 tokens/head", "CapKV"): [45.0, 25.0, 15.0],
        ("128 tokens/head", "Full cache"): [50.0, 40.0, 30.0],
        ("128 tokens/head", "CapKV"): [48.0, 30.0, 20.0],
        ("128 tokens/head", "SnapKV"): [40.0, 20.0, 10.0],
    }


def test_make_reproduce_names_the_command_that_adds_longbench() -> None:
    result = subprocess.run(
        ["make", "-n", "reproduce"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    hint = [line for line in result.stdout.splitlines() if "LongBench is not run here" in line]
    assert len(hint) == 1
    assert "run.py experiment=longbench results_dir=results" in hint[0]
