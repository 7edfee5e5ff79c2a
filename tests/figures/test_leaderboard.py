"""The leaderboard ranks a results folder's methods by their mean score (no model loads)."""

from __future__ import annotations

import pandas as pd
import pytest

from capkv.figures.leaderboard import leaderboard_title, main, ranking


def main_table() -> pd.DataFrame:
    rows = [
        ("kvpress-tova", "ratio0.5", 40.0),
        ("kvpress-tova", "budget512", 20.0),
        ("capkv", "ratio0.5", 80.0),
        ("capkv", "budget512", 10.0),
        ("snapkv", "ratio0.5", 30.0),
        ("snapkv", "budget512", 62.0),
        ("full", "full", 90.0),
    ]
    frame = pd.DataFrame(rows, columns=["method", "budget", "average"])
    return frame.assign(model="m", protocol="query_aware")


def test_methods_are_ranked_by_their_mean_over_budgets_without_the_full_cache():
    table = ranking(main_table())
    assert list(table.index) == ["snapkv", "capkv", "kvpress-tova"]
    assert list(table["mean"]) == [46.0, 45.0, 30.0]
    assert table.loc["capkv", "ratio0.5"] == 80.0


def test_the_command_writes_the_table_and_the_figure(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    main_table().to_csv(results / "main_table.csv", index=False)
    main([str(results), str(tmp_path / "plots")])
    assert (tmp_path / "plots" / "leaderboard.png").stat().st_size > 0
    assert "| kvpress-tova |" in (tmp_path / "plots" / "leaderboard.md").read_text()


def test_a_folder_with_the_full_cache_alone_is_refused_in_one_line(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    main_table()[lambda t: t["method"] == "full"].to_csv(results / "main_table.csv", index=False)
    with pytest.raises(SystemExit, match="holds no run of an evicting method"):
        main([str(results), str(tmp_path / "plots")])
    assert not (tmp_path / "plots").exists()


def test_the_title_names_the_task_the_runs_and_the_intervals():
    table = main_table().assign(**{"needle_grid": 1.0, "needle_grid low": 0.0})
    table = table[["model", "protocol", "method", "budget", "needle_grid", "needle_grid low",
                   "average"]]  # fmt: skip
    title = leaderboard_title(table, "average")
    assert title.startswith("Methods ranked by their mean needle_grid score over budgets: m")
    assert "query_aware" in title and "95% bootstrap interval" in title
