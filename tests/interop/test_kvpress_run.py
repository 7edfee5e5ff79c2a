"""run.py with kvpress presses: a sweep mixing presses and our methods, and bad press input."""

from __future__ import annotations

import os

import pytest

from capkv.figures.cli import draw_all
from capkv.interop import kvpress_problem
from capkv.results.store import finished_rows, run_directory
from tests.harness.test_run import error_lines, run

PROBLEM = kvpress_problem()
requires_kvpress = pytest.mark.skipif(
    PROBLEM is not None and os.environ.get("CAPKV_REQUIRE_KVPRESS") != "1",  # then: fail
    reason=f"{PROBLEM}: make test runs this test in .venv-oracle",
)
TINY = ["model=tiny-random", "task.context_lengths=[200]", "task.depths=[0,100]"]


def rows_of(results, method, budget, protocol="context_only"):
    path = run_directory(results, "tiny-random", "needle", method, budget, protocol)
    return finished_rows(path)


@requires_kvpress
def test_a_sweep_mixes_presses_and_our_methods(tmp_path):
    """Kept sets of a sweep equal separate runs' (tests/interop/test_kvpress_scorers.py); here the folders,
    diagnostics, tables and figures of a sweep with presses under both budget conventions."""
    sweep = [
        "methods=[kvpress-tova,kvpress,streamingllm]",
        "method=kvpress",
        "method.press=SnapKVPress",
        "method.kwargs={window_size:8,kernel_size:3}",
        "budgets=[64]",
        "ratios=[0.5]",
        "protocol=context_only",
        "diagnostics=true",
    ]
    run(tmp_path, *TINY, *sweep)
    results = tmp_path / "results"
    for method in ("kvpress-tova", "kvpress-snapkv", "streamingllm"):
        for budget in ("budget64", "ratio0.5"):
            rows = rows_of(results, method, budget)
            assert len(rows) == 2 and all("capacity_fraction" in r["diagnostics"] for r in rows)
    assert max(rows_of(results, "kvpress-tova", "budget64")[0]["kept_tokens_per_layer"]) == 64
    assert "kvpress-tova" in (results / "main_table.csv").read_text()
    figures = draw_all(results, tmp_path / "plots")
    assert figures


@requires_kvpress
def test_press_settings_it_does_not_accept_are_refused(tmp_path):
    result = run(
        tmp_path, *TINY, "method=kvpress", "method.press=SnapKVPress", "method.kwargs={window:8}",
        check=False,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = error_lines(result)
    assert "SnapKVPress has no setting 'window'; its settings are: window_size, kernel_size" in line


@requires_kvpress
def test_presses_answer_each_shared_question_as_its_own_context_only_prompt(tmp_path):
    """A shared-context sweep mixing presses and our methods: each question answered from the
    context compressed once equals the same question prefilled on its own (context_only)."""
    sweep = [
        "model=tiny-random",
        "task.context_lengths=[400]",
        "task.depths=[0,100]",
        "task.num_needles=2",
        "methods=[kvpress-tova,kvpress-knorm,snapkv]",
        "budgets=[64]",
        "ratios=[0.5]",
    ]
    run(tmp_path, *sweep, "protocol=shared_context")
    run(tmp_path, *sweep, "protocol=context_only")
    results = tmp_path / "results"
    turn_fields = ("seconds", "turn", "turns", "context")
    for method in ("kvpress-tova", "kvpress-knorm", "snapkv"):
        for budget in ("budget64", "ratio0.5"):
            shared = rows_of(results, method, budget, "shared_context")
            alone = rows_of(results, method, budget, "context_only")
            assert len(shared) == len(alone) == 4
            assert [r["turn"] for r in shared] == [1, 2, 1, 2]
            assert [{k: v for k, v in r.items() if k not in turn_fields} for r in shared] == [
                {k: v for k, v in r.items() if k != "seconds"} for r in alone
            ]
