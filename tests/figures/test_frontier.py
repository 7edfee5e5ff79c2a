"""Score against KV bytes, drawn from ``frontier.csv`` alone: a point per byte-measured run in
its method's colour and its bit width's marker, the Pareto front a step line with its points
ringed, only where byte-measured runs are."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from matplotlib.collections import PathCollection
from matplotlib.colors import to_hex

from capkv import Budget
from capkv.figures.cli import main
from capkv.figures.data import load_frontier
from capkv.figures.frontier import frontier_jobs
from capkv.figures.style import method_style, safe_name
from capkv.results.tables import aggregate
from tests.results.test_frontier import MODEL, PROTOCOL, RUNS, TASK, row, write_byte_tree, write_run


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """The byte-measured tree of tests/results/test_frontier.py; tables built, then drawn."""
    base = tmp_path_factory.mktemp("frontier_figure")
    results = base / "results"
    write_byte_tree(results)
    aggregate(results)
    with redirect_stdout(io.StringIO()) as out:
        main(["--results", str(results), "--plots", str(base / "plots")])
    return results, base / "plots", out.getvalue()


def test_the_figure_is_written_in_the_project_s_name_pattern(drawn) -> None:
    _, plots, out = drawn
    stem = safe_name(MODEL, TASK, PROTOCOL, "frontier")
    assert stem == "org-tiny-0.5b_custom_task_query_aware_frontier"
    for suffix in (".png", ".pdf"):
        assert (plots / f"{stem}{suffix}").stat().st_size > 0
        assert f"{stem}{suffix}" in out
    assert len(list(plots.glob("*_frontier.png"))) == 1


def test_each_run_is_a_point_in_its_colour_and_marker_and_the_front_a_step(drawn) -> None:
    results, plots, _ = drawn
    (job,) = frontier_jobs(load_frontier(results), plots)
    figure = job[1](*job[2])
    (ax,) = [ax for ax in figure.axes if ax.axison]
    data = [container.lines[0] for container in ax.containers]
    points = {
        (round(line.get_xdata()[0], 6), line.get_ydata()[0]): (
            to_hex(line.get_color()),
            line.get_marker(),
        )
        for line in data
    }
    assert len(ax.containers) == len(RUNS)  # a whisker per run
    red, blue = (method_style(method)["color"] for method in ("capkv", "snapkv"))
    assert points[0.25, 100.0] == (red, "s")  # 4-bit CapKV
    assert points[0.25, 0.0] == (blue, "^")  # SnapKV at the float32 model's 32 bits
    assert points[0.2, 75.0] == ("#000000", "v")  # the 2-bit full cache
    assert points[1.0, 100.0] == ("#000000", "o")  # the bf16 full cache
    (front,) = [line for line in ax.get_lines() if line.get_label() == "Pareto front"]
    assert list(front.get_xdata()) == pytest.approx([0.2, 0.25, 2.0])  # to the most bytes held
    assert list(front.get_ydata()) == pytest.approx([75.0, 100.0, 100.0])
    assert front.get_drawstyle() == "steps-post"
    (rings,) = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert rings.get_offsets().ravel().tolist() == pytest.approx([0.2, 75.0, 0.25, 100.0])
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1/8", "1/4", "1/2", "1", "2"]
    assert "16-bit full cache" in ax.get_xlabel() and ax.get_ylabel() == "m (0-100)"
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend == ["Full cache", "CapKV", "SnapKV", "2-bit", "4-bit", "16-bit", "32-bit"] + [
        "Pareto front"
    ]
    title = figure.texts[0].get_text()
    assert title.startswith(f"Score against KV bytes: {MODEL} · {TASK} · {PROTOCOL}")
    assert "95% bootstrap intervals" in title


def test_no_frontier_figure_without_byte_measured_runs(tmp_path: Path) -> None:
    results = tmp_path / "results"
    write_run(results, "capkv", None, Budget(tokens=64), [row("a", 0, 1.0, None, 0.0)])
    aggregate(results)
    main(["--results", str(results), "--plots", str(tmp_path / "plots")])
    assert not list((tmp_path / "plots").glob("*frontier*"))
