"""The main table: headline per task, one column per task family, an honest average."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from capkv.results import CONFIG, METRICS, RUNS, aggregate, main_table, task_reportings
from capkv.tasks.base import Reporting, task_reporting

ROOT = Path(__file__).resolve().parent.parent


def score_rows(task: str, method: str, budget: str, subtasks: dict[str, float]) -> list[dict]:
    """score_table rows of one run: the average over subtasks first, then each subtask, each
    with a headline metric ``m`` and a second metric ``other`` that must be ignored."""
    run = {"model": "tiny", "task": task, "method": method, "budget": budget, "protocol": "qa"}
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
