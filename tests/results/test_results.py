"""The main table: headline per task, one column per task family, an honest average; every
score with its interval, and paired comparisons, rebuilt from the run folders alone."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from capkv import Budget
from capkv.results.metrics import task_reportings, write_metrics
from capkv.results.store import (
    CONFIG,
    EXAMPLES,
    METRICS,
    RUNS,
    ExampleLog,
    identity_directory,
    run_identity,
)
from capkv.results.tables import aggregate, main_table
from capkv.tasks.base import Reporting, task_reporting
from capkv.tasks.perplexity import text_fields

ROOT = Path(__file__).resolve().parents[2]


def score_rows(task: str, method: str, budget: str, subtasks: dict[str, float]) -> list[dict]:
    """score_table rows of one run: the average over subtasks first, then each subtask, each
    with a headline metric ``m`` and a second metric ``other`` that must be ignored."""
    run = {"model": "tiny", "task": task, "method": method, "variant": "", "budget": budget}
    run["protocol"] = "qa"
    average = sum(subtasks.values()) / len(subtasks) if subtasks else 50.0
    rows = []
    for subtask, score in [("average", average), *subtasks.items()]:
        rows.append({**run, "subtask": subtask, "metric": "m", "score": score})
        rows.append({**run, "subtask": subtask, "metric": "other", "score": -1.0})
    return rows


def test_main_table_has_family_columns_and_averages_only_complete_rows():
    ruler = {"niah_single": 80.0, "niah_multikey": 60.0, "vt": 40.0, "cwe": 10.0, "fwe": 30.0}
    scores = pd.DataFrame(
        score_rows("ruler", "capkv", "ratio0.5", ruler)
        + score_rows("needle", "capkv", "ratio0.5", {})
        + score_rows("needle", "capkv", "ratio0.25", {})
    )
    # The families are RULER's own (as its task reports them); the headline is the metric "m".
    families = task_reporting({"_target_": "capkv.tasks.ruler.RulerSuite"}).families
    reportings = {"ruler": Reporting("ruler", "m", families), "needle": Reporting("needle", "m")}
    table = main_table(scores, reportings).set_index("budget")
    assert list(table.columns[3:]) == [
        "needle",
        "ruler: NIAH",
        "ruler: Variable tracking",
        "ruler: Aggregation",
        "ruler",
        "average",
    ]
    row = table.loc["ratio0.5"]
    assert row["ruler: NIAH"] == 70.0 and row["ruler: Aggregation"] == 20.0
    assert row["ruler"] == 44.0 and row["average"] == (44.0 + 50.0) / 2
    assert math.isnan(table.loc["ratio0.25", "average"])  # no RULER score: no average


def test_committed_tables_come_out_of_their_run_folders_unchanged(tmp_path):
    """The committed runs predate saving the task's reporting in metrics.json: the tables ask
    the task their config.yaml names, and come out byte for byte as committed."""
    for folder in ("", "context_limit"):
        committed = ROOT / "results" / folder
        copy = tmp_path / folder
        shutil.copytree(committed / RUNS, copy / RUNS)
        aggregate(copy)
        for name in ("main_table.md", "main_table.csv", "scores.csv", "needle.csv"):
            assert (copy / name).read_bytes() == (committed / name).read_bytes(), (folder, name)


def test_a_run_without_saved_reporting_asks_the_task_of_its_config(tmp_path):
    run_dir = tmp_path / "runs" / "m" / "ruler" / "capkv" / "b" / "qa"
    run_dir.mkdir(parents=True)
    task = {"_target_": "capkv.tasks.ruler.RulerSuite", "subtasks": ["vt", "cwe"]}
    config = {"model": {}, "method": {}, "task": task}
    (run_dir / CONFIG).write_text(yaml.safe_dump(config))
    metrics = {"task": "ruler"}
    assert task_reportings({run_dir / METRICS: metrics}) == {
        "ruler": Reporting(
            "ruler", "string_match_all", {"vt": "Variable tracking", "cwe": "Aggregation"}
        )
    }
    (run_dir / CONFIG).unlink()  # neither saved nor configured: no reporting
    assert task_reportings({run_dir / METRICS: metrics}) == {}


def test_a_task_class_without_reporting_is_named():
    with pytest.raises(ValueError, match="CappedTask does not say how its scores are reported"):
        task_reporting({"_target_": "capkv.tasks.base.CappedTask"})


# ----------------------------------------------------------------------------- uncertainty


def write_ruler_run(results: Path, method: str, budget: Budget | None, scores: list[float]):
    """A run folder of a two-family task (niah_single, vt; 10 examples each) as the runner
    writes it; ``scores`` gives each example's score, niah_single's first."""
    identity = run_identity("tiny", "ruler", method, "", budget, "query_aware")
    rows = [
        {
            "example_id": f"{subtask}/{i}",
            "subtask": subtask,
            "scores": {"m": scores[10 * s + i]},
            "prompt_tokens": 100,
            "kept_tokens_per_layer": [50, 50],
        }
        for s, subtask in enumerate(["niah_single", "vt"])
        for i in range(10)
    ]
    run_dir = identity_directory(results, identity)
    log = ExampleLog(run_dir / EXAMPLES, [])
    for row in reversed(rows):  # the file order does not change the intervals
        log.append(row)
    log.close()
    families = {"niah_single": "NIAH", "vt": "Variable tracking"}
    write_metrics(run_dir, identity, rows, reporting=Reporting("ruler", "m", families))


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs where SnapKV answers exactly as CapKV, and the full cache beats both on every
    example; tables built from the run folders alone."""
    results = tmp_path_factory.mktemp("uncertainty")
    capkv = list(np.random.default_rng(0).random(20) * 0.8)
    write_ruler_run(results, "capkv", Budget(ratio=0.5), capkv)
    write_ruler_run(results, "snapkv", Budget(ratio=0.5), capkv)
    write_ruler_run(results, "full", None, [score + 0.2 for score in capkv])
    aggregate(results)
    return results


def test_main_table_cells_carry_their_examples_and_interval(tables: Path) -> None:
    table = pd.read_csv(tables / "main_table.csv").set_index("method")
    for column in ["ruler", "ruler: NIAH", "ruler: Variable tracking", "average"]:
        for method, row in table.iterrows():
            assert row[f"{column} low"] <= row[column] <= row[f"{column} high"], (method, column)
    assert table.loc["capkv", "ruler n"] == 20 and table.loc["capkv", "ruler: NIAH n"] == 10
    text = (tables / "main_table.md").read_text()
    assert "bootstrap" in text and "ruler (n=20)" in text
    row = table.loc["capkv"]
    assert f"| {row['ruler']:.1f} [{row['ruler low']:.1f}, {row['ruler high']:.1f}] |" in text


def test_the_headline_interval_resamples_within_subtasks(tables: Path) -> None:
    intervals = pd.read_csv(tables / "intervals.csv")
    capkv = intervals[(intervals["method"] == "capkv") & (intervals["metric"] == "m")]
    by_group = capkv.set_index("group")
    assert set(capkv["level"]) == {"task", "family", "subtask"}
    assert by_group.loc["average", "mean"] == pytest.approx(
        (by_group.loc["niah_single", "mean"] + by_group.loc["vt", "mean"]) / 2
    )
    assert by_group.loc["average", "n"] == 20
    # Averaging two independent subtasks narrows the interval below either subtask's.
    width = by_group["high"] - by_group["low"]
    assert width["average"] < min(width["niah_single"], width["vt"])


def test_paired_comparisons_call_identical_methods_a_tie_and_a_uniform_gain_significant(
    tables: Path,
) -> None:
    paired = pd.read_csv(tables / "paired.csv")
    task = paired[paired["level"] == "task"].set_index(["method", "reference"])
    same = task.loc[("snapkv", "capkv")]
    assert (same["difference"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    assert same["verdict"] == "tie" and same["p_value"] == 1.0 and same["ties"] == 20
    worse = task.loc[("capkv", "full")]
    assert worse["difference"] == pytest.approx(-20.0) and worse["high"] < 0
    assert worse["verdict"] == "worse" and worse["p_value"] < 0.01 and worse["losses"] == 20
    assert ("full", "full") not in task.index and ("capkv", "capkv") not in task.index
    assert (
        "| snapkv | capkv | 20 | 0.0 [0.0, 0.0] | 1.000 | 0/0/20 | tie |"
        in (tables / "paired.md").read_text()
    )


def test_tables_are_a_function_of_the_run_folders_alone(tables: Path, tmp_path: Path) -> None:
    names = ["main_table.csv", "main_table.md", "intervals.csv", "paired.csv", "paired.md"]
    before = {name: (tables / name).read_text() for name in names}
    copy = tmp_path / "copy"
    shutil.copytree(tables / "runs", copy / "runs")
    aggregate(copy)
    assert {name: (copy / name).read_text() for name in names} == before


# ----------------------------------------------------------------------------- perplexity


def write_perplexity_run(results: Path, method: str, budget: Budget | None, shift: float) -> None:
    """A perplexity run of three 9-token texts (buckets of 4 positions) as the runner writes it:
    text ``i``'s token ``p`` has NLL ``1 + i / 10 + p / 100 + shift``."""
    identity = run_identity("tiny", "perplexity", method, "chunk4", budget, "query_aware")
    rows = []
    for i in range(3):
        nll = [1 + i / 10 + p / 100 + shift for p in range(1, 9)]
        fields = text_fields(nll, bucket=4)
        rows.append(
            {
                "example_id": f"essay{i}-9",
                "subtask": None,
                "prompt_tokens": 9,
                "kept_tokens_per_layer": [4, 4],
                "peak_tokens_per_layer": [8, 8 if budget is not None else 9],
                **fields,
            }
        )
    run_dir = identity_directory(results, identity)
    log = ExampleLog(run_dir / EXAMPLES, [])
    for row in rows:
        log.append(row)
    log.close()
    write_metrics(run_dir, identity, rows, reporting=Reporting("perplexity", "perplexity"))


def test_perplexity_gets_its_own_table_and_stays_out_of_the_0_100_tables(tmp_path: Path) -> None:
    plain, mixed = tmp_path / "plain", tmp_path / "mixed"
    for results in (plain, mixed):
        write_ruler_run(results, "capkv", Budget(ratio=0.5), [0.5] * 20)
        write_ruler_run(results, "full", None, [0.7] * 20)
    write_perplexity_run(mixed, "full", None, 0.0)
    write_perplexity_run(mixed, "capkv", Budget(tokens=4), math.log(2))
    aggregate(plain)
    aggregate(mixed)
    for name in ("main_table.csv", "main_table.md", "intervals.csv", "paired.csv"):
        assert (mixed / name).read_text() == (plain / name).read_text(), name
    metrics = json.loads(next((mixed / RUNS).rglob("full*/full/*/" + METRICS)).read_text())
    full_nll = [1 + i / 10 + p / 100 for i in range(3) for p in range(1, 9)]
    assert metrics["scores"]["perplexity"] == pytest.approx(math.exp(np.mean(full_nll)))
    table = pd.read_csv(mixed / "perplexity.csv")
    assert list(table["positions"][:3]) == ["all", "0-4", "4-8"]
    assert list(table["tokens"][:4]) == [24, 9, 12, 3]  # position 0 is not scored
    whole = table[table["positions"] == "all"].set_index("method")
    assert whole.loc["full", "perplexity"] == pytest.approx(metrics["scores"]["perplexity"])
    assert whole.loc["full", "low"] < whole.loc["full", "perplexity"] < whole.loc["full", "high"]
    capkv = whole.loc["capkv"]  # every token's NLL up by log 2: twice the perplexity
    assert capkv["ratio_to_full"] == pytest.approx(2.0)
    assert (capkv["ratio_low"], capkv["ratio_high"]) == pytest.approx((2.0, 2.0))
    assert capkv["full_perplexity"] == pytest.approx(whole.loc["full", "perplexity"])
    assert (capkv["peak_tokens"], whole.loc["full", "peak_tokens"]) == (8, 9)
    text = (mixed / "perplexity.md").read_text()
    assert "lower is better" in text and "| capkv-chunk4 | budget4 | 3 | 8 |" in text
    assert not (plain / "perplexity.csv").exists() and not (plain / "perplexity.md").exists()


def test_a_non_uniform_allocation_is_also_paired_with_its_uniform_method(tmp_path) -> None:
    """Ada-SnapKV is compared with SnapKV at its budget (besides CapKV and the full cache); a
    method's uniform run is found by its config (same section but allocation, floor, rounds)."""
    scores = list(np.random.default_rng(1).random(20))
    sections = {
        "capkv": {"_target_": "capkv.CapKV", "tau": 5.0, "allocation": "uniform"},
        "capkv_iterative": {"_target_": "capkv.CapKV", "tau": 5.0, "rounds": 4},
        "snapkv": {"_target_": "baselines.SnapKV", "window": 32, "allocation": "uniform"},
        "snapkv_adaptive": {"_target_": "baselines.SnapKV", "window": 32, "floor": 0.1}
        | {"allocation": "adaptive"},
        "snapkv_wide": {"_target_": "baselines.SnapKV", "window": 64, "allocation": "adaptive"},
    }
    for method, section in sections.items():
        write_ruler_run(tmp_path, method, Budget(ratio=0.5), scores)
        identity = run_identity("tiny", "ruler", method, "", Budget(ratio=0.5), "query_aware")
        config = {"model": {}, "method": section, "task": {}}
        (identity_directory(tmp_path, identity) / CONFIG).write_text(yaml.safe_dump(config))
    aggregate(tmp_path)
    paired = pd.read_csv(tmp_path / "paired.csv")
    references = paired[paired["level"] == "task"].groupby("method")["reference"].agg(set)
    assert references["snapkv_adaptive"] == {"capkv", "snapkv"}
    assert references["capkv_iterative"] == {"capkv"}  # its uniform method is CapKV: one pair
    assert references["snapkv_wide"] == {"capkv"}  # another window: no uniform run of it
    assert references["snapkv"] == {"capkv"}
