"""Figures and tables drawn from a small synthetic results tree written as the runner writes it."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import pandas as pd
import pytest

from capkv import Budget
from capkv.figures.canvas import fitted_title, legend_and_title, new_figure, panel_grid
from capkv.figures.cli import main
from capkv.figures.style import budget_display, budget_sort_key, safe_name
from capkv.results.metrics import write_metrics
from capkv.results.store import EXAMPLES, ExampleLog, identity_directory, run_identity
from capkv.results.tables import aggregate
from capkv.tasks.base import Reporting, task_reporting
from capkv.tasks.perplexity import text_fields

MODEL = "org/tiny-0.5b"  # a slash and a dot: file names must be path-safe and whole
PROTOCOL = "query_aware"
RUNS = [("capkv", "budget64"), ("capkv", "budget128"), ("snapkv", "budget64")]
RUNS += [("snapkv", "budget128"), ("full", "full")]
LONGBENCH = {"narrativeqa": [0.2, 0.4], "hotpotqa": [0.5, 1.0]}  # two examples per subtask
BUDGETS = {"budget64": Budget(tokens=64), "budget128": Budget(tokens=128), "full": None}


def quality(method: str, budget: str) -> float:
    """A made-up score in [0, 1] per run: more cache is better, CapKV beats SnapKV."""
    kept = {"budget64": 0.5, "budget128": 0.75, "full": 1.0}[budget]
    return kept * (1.0 if method in ("capkv", "full") else 0.8)


def row(example_id: str, subtask: str | None, scores: dict, metadata: dict) -> dict:
    """One ``examples.jsonl`` row, with the fields :func:`capkv.harness.runner.run_cell` writes."""
    return {
        "example_id": example_id,
        "subtask": subtask,
        "prediction": "42",
        "answers": ["42"],
        "scores": scores,
        "prompt_tokens": metadata.get("context_length", 900) + 20,
        "kept_tokens_per_layer": [64, 64],
        "seconds": 0.1,
        "metadata": metadata,
    }


def needle_rows(method: str, budget: str) -> list[dict]:
    """A 2 x 2 grid (lengths 1024, 2048 x depths 0, 100); the long deep needle is missed."""
    rows = []
    for length in (1024, 2048):
        for depth in (0.0, 100.0):
            exact = 0.0 if (length, depth) == (2048, 100.0) and method != "full" else 1.0
            scores = {"exact": exact, "graded": quality(method, budget)}
            metadata = {"context_length": length, "depth": depth, "needle_kind": "magic_number"}
            rows.append(row(f"len{length}_depth{depth:g}", None, scores, metadata))
    return rows


def longbench_rows(method: str, budget: str) -> list[dict]:
    """Two subtasks from two LongBench families, two examples each."""
    rows = []
    for subtask, values in LONGBENCH.items():
        for index, value in enumerate(values):
            scores = {"score": value * quality(method, budget)}
            metadata = {"subtask": subtask, "all_classes": None, "length": 900}
            rows.append(row(f"{subtask}/{index}", subtask, scores, metadata))
    return rows


def write_run(results: Path, task: str, method: str, budget: str, rows: list[dict]) -> None:
    """One run folder with ``examples.jsonl`` and ``metrics.json``, as the runner writes it."""
    identity = run_identity(MODEL, task, method, "", BUDGETS[budget], PROTOCOL)
    run_dir = identity_directory(results, identity)
    log = ExampleLog(run_dir / EXAMPLES, [])
    for example in rows:
        log.append(example)
    log.close()
    target = {
        "needle": "capkv.tasks.needle.NeedleTask",
        "longbench": "capkv.tasks.longbench.LongBench",
    }
    write_metrics(run_dir, identity, rows, reporting=task_reporting({"_target_": target[task]}))


def draw_tree(base: Path) -> tuple[Path, str]:
    """Write a results tree with a needle and a LongBench task under ``base``, build its tables
    and draw it; return the plots folder and what was printed."""
    results = base / "results"
    for method, budget in RUNS:
        write_run(results, "needle", method, budget, needle_rows(method, budget))
        write_run(results, "longbench", method, budget, longbench_rows(method, budget))
    aggregate(results)
    with redirect_stdout(io.StringIO()) as out:
        main(["--results", str(results), "--plots", str(base / "plots")])
    return base / "plots", out.getvalue()


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Plots drawn once for the tests that only read them."""
    return draw_tree(tmp_path_factory.mktemp("drawn"))


def test_figures_and_tables_are_written(drawn: tuple[Path, str]) -> None:
    plots, out = drawn
    stems = [
        "heatmaps/org-tiny-0.5b_needle_query_aware_capkv_budget64_exact",
        "heatmaps/org-tiny-0.5b_needle_query_aware_full_full_graded",
        "org-tiny-0.5b_needle_query_aware_exact_heatmaps",
        "org-tiny-0.5b_needle_query_aware_graded_heatmaps",
        "org-tiny-0.5b_needle_query_aware_exact_vs_tokens",
        "org-tiny-0.5b_longbench_query_aware_score_vs_tokens",
    ]
    files = [plots / f"{stem}.{suffix}" for stem in stems for suffix in ("png", "pdf")]
    files += [
        plots / f"org-tiny-0.5b_{task}_query_aware_table.{suffix}"
        for task in ("needle", "longbench")
        for suffix in ("md", "csv")
    ]
    for path in files:
        assert path.stat().st_size > 0, path
        assert str(path) in out
    assert len(list((plots / "heatmaps").glob("*.png"))) == len(RUNS) * 2
    assert not list(plots.glob("*_vs_ratio.*"))  # no ratio budgets were run


def test_task_table_holds_the_run_scores(drawn: tuple[Path, str]) -> None:
    plots, _ = drawn
    table = pd.read_csv(plots / "org-tiny-0.5b_longbench_query_aware_table.csv")
    scores = [c for c in table.columns if not c.endswith((" low", " high", " n"))]
    assert scores == ["method", "budget", "metric", "narrativeqa", "hotpotqa", "average"]
    for column in scores[3:]:  # every score with its interval and number of examples
        assert (table[f"{column} low"] <= table[column]).all()
        assert (table[column] <= table[f"{column} high"]).all()
    assert list(table["average n"]) == [4] * 5 and list(table["hotpotqa n"]) == [2] * 5
    assert list(zip(table["method"], table["budget"], strict=True)) == [
        ("full", "full"),
        ("capkv", "budget64"),
        ("capkv", "budget128"),
        ("snapkv", "budget64"),
        ("snapkv", "budget128"),
    ]
    for method, budget, narrativeqa, hotpotqa, average in table[
        ["method", "budget", "narrativeqa", "hotpotqa", "average"]
    ].itertuples(index=False):
        q = quality(method, budget)
        assert narrativeqa == pytest.approx(100 * q * 0.3)
        assert hotpotqa == pytest.approx(100 * q * 0.75)
        assert average == pytest.approx((narrativeqa + hotpotqa) / 2)
    needle = pd.read_csv(plots / "org-tiny-0.5b_needle_query_aware_table.csv")
    capkv = needle[(needle["method"] == "capkv") & (needle["budget"] == "budget64")]
    assert dict(zip(capkv["metric"], capkv["average"], strict=True)) == pytest.approx(
        {"exact": 75.0, "graded": 50.0}
    )
    assert (
        "| capkv | budget64 | score | 15.0 [10.0, 20.0] | 37.5 [25.0, 50.0] | 26.2 ["
        in (plots / "org-tiny-0.5b_longbench_query_aware_table.md").read_text()
    )


def test_drawing_never_rewrites_the_tables_and_refuses_stale_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plots, _ = draw_tree(tmp_path)
    results = plots.parent / "results"
    tables = {path: path.read_bytes() for path in results.glob("*.*")}
    arguments = ["--results", str(results), "--plots", str(plots)]
    main(arguments)
    assert {path: path.read_bytes() for path in results.glob("*.*")} == tables
    scaled = [
        {**r, "scores": {"score": r["scores"]["score"] / 2}}
        for r in longbench_rows("capkv", "budget64")
    ]
    write_run(results, "longbench", "capkv", "budget64", scaled)  # a run newer than the tables
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(arguments)
    assert stop.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {results / 'scores.csv'} is older than the run folders")
    assert "`make tables`" in line
    (results / "scores.csv").unlink()
    with pytest.raises(SystemExit):
        main(arguments)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "scores.csv is missing" in line and "`make tables`" in line
    aggregate(results)
    main(arguments)
    assert "org-tiny-0.5b_longbench_query_aware_score_vs_tokens.png" in capsys.readouterr().out


@pytest.mark.parametrize("results_exist", [False, True])
def test_nothing_to_draw(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], results_exist: bool
) -> None:
    results = tmp_path / "results"
    if results_exist:  # a runs folder without finished runs (and no tables yet)
        (results / "runs").mkdir(parents=True)
    main(["--results", str(results), "--plots", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert out.startswith("Nothing to draw") and "python run.py" in out
    assert len(out.strip().splitlines()) == 1
    assert not (tmp_path / "plots").exists()


def test_budgets_are_named_and_ordered_from_their_fields() -> None:
    nan = float("nan")
    assert budget_display(512, nan) == "512 tokens/head"
    assert budget_display(nan, 0.5) == "50% removed"
    assert budget_display(None, None) == "full cache"
    budgets = [(nan, 0.25), (512, nan), (nan, nan), (nan, 0.75), (64, nan)]
    assert [budget_display(*b) for b in sorted(budgets, key=lambda b: budget_sort_key(*b))] == [
        "full cache",
        "64 tokens/head",
        "512 tokens/head",
        "75% removed",
        "25% removed",
    ]
    assert (
        safe_name("meta-llama/Llama 3", "needle", "capkv-v2")
        == "meta-llama-Llama-3_needle_capkv-v2"
    )


def test_a_title_too_wide_for_its_figure_breaks_after_its_colon_then_between_words() -> None:
    title = "Needle in a haystack, graded score (0-1): smollm2-135m · needle · query_aware"
    assert fitted_title(title, width=12.0) == title
    assert fitted_title(title, width=4.9) == (
        "Needle in a haystack, graded score (0-1):\nsmollm2-135m · needle · query_aware"
    )
    words = "no colon " * 20
    lines = fitted_title(words, width=2.0).split("\n")
    assert len(lines) > 1 and " ".join(lines) == words.strip()
    assert max(map(len, lines)) < len(words) / 4


def test_a_long_legend_and_title_grow_the_figure_and_overlap_no_panel() -> None:
    """The kvpress leaderboard's case: 25 methods with long names beside one panel."""
    figure = new_figure(6.2, 3.9)
    (ax,) = panel_grid(figure, (1, 1), (0.8, 2.4, 0.7, 0.8), (0.8, 0.9)).ravel()
    for i in range(25):
        ax.plot([50, 75], [i, i + 1], label=f"kvpress-observedattention-{i}")
    title = (
        "exact against compression ratio (bands: 95% bootstrap intervals): "
        "smollm2-135m · needle_grid · query_aware"
    )
    panel_inches = ax.get_position().width * 6.2, ax.get_position().height * 3.9
    legend_and_title(figure, [ax], title, 0.8)
    renderer = figure.canvas.get_renderer()
    whole = figure.bbox
    key, heading = figure.legends[0], figure._suptitle
    for artist in (key, heading):
        box = artist.get_window_extent(renderer)
        assert whole.x0 <= box.x0 and box.x1 <= whole.x1 and whole.y0 <= box.y0
        assert box.y1 <= whole.y1
        assert not box.overlaps(ax.get_window_extent(renderer))
    assert "\n" in heading.get_text()
    width, height = figure.get_size_inches()
    assert width > 6.2 and height > 3.9
    assert ax.get_position().width * width == pytest.approx(panel_inches[0])
    assert ax.get_position().height * height >= panel_inches[1]


def test_a_legend_and_title_that_fit_leave_the_figure_as_it_was() -> None:
    figure = new_figure(8.0, 4.0)
    (ax,) = panel_grid(figure, (1, 1), (0.8, 2.4, 0.7, 0.8), (0.8, 0.9)).ravel()
    ax.plot([1, 2], [1, 2], label="CapKV")
    before = ax.get_position().bounds
    legend_and_title(figure, [ax], "short title", 0.8)
    assert tuple(figure.get_size_inches()) == (8.0, 4.0)
    assert ax.get_position().bounds == before


def write_perplexity_run(results: Path, method: str, budget: str, shift: float) -> None:
    """A perplexity run of two 8-token texts in buckets of 4 positions, as the runner writes it."""
    identity = run_identity(MODEL, "perplexity", method, "chunk4", BUDGETS[budget], PROTOCOL)
    run_dir = identity_directory(results, identity)
    rows = [
        {
            **row(f"essay{i}-8", None, {}, {}),
            **text_fields([2 + i / 10 + p / 50 + shift for p in range(1, 8)], bucket=4),
            "peak_tokens_per_layer": [8, 8],
        }
        for i in range(2)
    ]
    log = ExampleLog(run_dir / EXAMPLES, [])
    for example in rows:
        log.append(example)
    log.close()
    write_metrics(run_dir, identity, rows, reporting=Reporting("perplexity", "perplexity"))


def test_perplexity_against_position_is_drawn_from_its_table_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results, plots = tmp_path / "results", tmp_path / "plots"
    for method, budget, shift in [("full", "full", 0), ("capkv", "budget64", 0.1)]:
        write_perplexity_run(results, method, budget, shift)
    write_perplexity_run(results, "snapkv", "budget64", 0.3)
    write_perplexity_run(results, "snapkv", "budget128", 0.2)
    aggregate(results)
    arguments = ["--results", str(results), "--plots", str(plots)]
    main(arguments)
    stem = plots / safe_name(MODEL, "perplexity", PROTOCOL, "perplexity_by_position")
    assert stem.with_name(stem.name + ".png").stat().st_size > 0
    assert str(stem.with_name(stem.name + ".pdf")) in capsys.readouterr().out
    assert not list(plots.glob("*_vs_tokens.*"))  # perplexity is not a 0-100 score
    (results / "perplexity.csv").unlink()
    with pytest.raises(SystemExit):
        main(arguments)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "perplexity.csv is missing" in line and "`make tables`" in line
