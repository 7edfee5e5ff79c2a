"""Score against question index, drawn from ``turns.csv`` alone: a panel per budget, a line per
method (the full cache in every panel), only where shared-context runs are."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from capkv import Budget
from capkv.figures.cli import main
from capkv.figures.data import load_turns
from capkv.figures.style import safe_name
from capkv.figures.turns import turn_jobs
from capkv.results.tables import aggregate
from tests.results.test_turns import (
    MODEL,
    SCORES,
    SHARED,
    TASK,
    row,
    shared_rows,
    write_run,
    write_shared_tree,
)


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """The shared tree of tests/results/test_turns.py, with CapKV at 128 tokens and the full
    cache too; tables built, then drawn."""
    base = tmp_path_factory.mktemp("turn_figure")
    results = base / "results"
    write_shared_tree(results)
    write_run(results, "capkv", "", Budget(tokens=128), SHARED, shared_rows(SCORES["snapkv", ""]))
    full = {turn: {"a": 1.0, "b": 1.0} for turn in (1, 2, 3)}
    write_run(results, "full", "", None, SHARED, shared_rows(full))
    aggregate(results)
    with redirect_stdout(io.StringIO()) as out:
        main(["--results", str(results), "--plots", str(base / "plots")])
    return results, base / "plots", out.getvalue()


def test_the_figure_is_written_in_the_project_s_name_pattern(drawn) -> None:
    _, plots, out = drawn
    stem = safe_name(MODEL, TASK, SHARED, "score_by_turn")
    assert stem == "org-tiny-0.5b_scbench_kv_shared_context_score_by_turn"
    for suffix in (".png", ".pdf"):
        assert (plots / f"{stem}{suffix}").stat().st_size > 0
        assert f"{stem}{suffix}" in out
    assert len(list(plots.glob("*_score_by_turn.png"))) == 1  # the query-aware run has none


def test_each_budget_is_a_panel_and_each_method_a_line_through_its_turns(drawn) -> None:
    results, plots, _ = drawn
    (job,) = turn_jobs(load_turns(results), plots)
    figure = job[1](*job[2])
    panels = [ax for ax in figure.axes if ax.axison]
    assert [ax.get_title() for ax in panels] == ["64 tokens/head", "128 tokens/head"]
    drawn_lines = {
        (ax.get_title(), line.get_label()): list(line.get_ydata())
        for ax in panels
        for line in ax.get_lines()
    }
    assert drawn_lines == {
        ("64 tokens/head", "Full cache"): [100.0, 100.0, 100.0],
        ("64 tokens/head", "CapKV"): [50.0, 50.0, 0.0],
        ("64 tokens/head", "CapKV (accumulate)"): [50.0, 100.0, 50.0],
        ("64 tokens/head", "SnapKV"): [50.0, 0.0, 0.0],
        ("64 tokens/head", "SnapKV (accumulate)"): [50.0, 100.0, 50.0],
        ("128 tokens/head", "Full cache"): [100.0, 100.0, 100.0],
        ("128 tokens/head", "CapKV"): [50.0, 0.0, 0.0],
    }
    first = panels[0]
    assert [line.get_label() for line in first.get_lines()][:2] == ["Full cache", "CapKV"]
    assert [t.get_text() for t in first.get_xticklabels()] == ["1", "2", "3"]
    assert first.get_xlabel().startswith("question index") and first.get_ylabel() == "m (0-100)"
    assert len(first.collections) == 5  # a band per line
    assert figure.texts[0].get_text().startswith("Score against question index")
    assert [t.get_text() for t in figure.legends[0].get_texts()][0] == "Full cache"


def test_no_turn_figure_without_shared_runs(tmp_path: Path) -> None:
    results = tmp_path / "results"
    write_run(results, "capkv", "", Budget(tokens=64), "query_aware", [row("a/0", "a", 1.0)])
    aggregate(results)
    main(["--results", str(results), "--plots", str(tmp_path / "plots")])
    assert not list((tmp_path / "plots").glob("*score_by_turn*"))
