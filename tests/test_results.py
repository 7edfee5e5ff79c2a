"""The main table: headline per task, one column per task family, an honest average."""

from __future__ import annotations

import math

import pandas as pd

from capkv.results import main_table


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
    table = main_table(scores).set_index("budget")
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
