"""Making and writing figures: a figure on the Agg canvas, a fixed grid of panels, a shared
legend and title, and the rendering of many figures in parallel, each as PNG and PDF."""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

FIGURE_SUFFIXES = (".png", ".pdf")
TITLE_SIZE = 11.0  # points
TITLE_LINE = 0.2  # inches per line of an 11-point title
EDGE = 0.12  # inches between the figure's edge and its title or legend

Job = tuple[Path, Callable[..., Figure], tuple[Any, ...]]  # (file stem, draw function, arguments)


def new_figure(width: float, height: float) -> Figure:
    """A figure on the non-interactive Agg canvas (no pyplot, no global state). Layouts are fixed
    in inches: constrained layout would triple the time of a grid of annotated heatmaps."""
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def panel_grid(
    figure: Figure,
    shape: tuple[int, int],
    margins: tuple[float, float, float, float],
    gaps: tuple[float, float],
) -> np.ndarray:
    """A ``rows x columns`` array of axes inside ``margins`` (left, right, bottom, top) and with
    ``gaps`` (horizontal, vertical) between panels, all in inches."""
    width, height = figure.get_size_inches()
    left, right, bottom, top = margins
    rows, columns = shape
    panel_width = (width - left - right - gaps[0] * (columns - 1)) / columns
    panel_height = (height - bottom - top - gaps[1] * (rows - 1)) / rows
    spacing = {"wspace": gaps[0] / panel_width, "hspace": gaps[1] / panel_height}
    box = {"left": left / width, "right": 1 - right / width}
    box |= {"bottom": bottom / height, "top": 1 - top / height}
    return figure.subplots(rows, columns, squeeze=False, gridspec_kw=box | spacing)


def fitted_title(title: str, width: float, fontsize: float = TITLE_SIZE) -> str:
    """``title`` with each line that would be wider than ``width`` inches broken: after its
    last colon (a title's "what: where" parts), then between words. A character is taken as
    0.55 em, wide for DejaVu Sans' average."""
    per_line = max(12, int((width - 0.2) / (0.55 * fontsize / 72)))
    lines = []
    for line in title.split("\n"):
        head, colon, tail = line.rpartition(": ")
        parts = [f"{head}:", tail] if colon and len(line) > per_line else [line]
        lines += [wrapped for part in parts for wrapped in textwrap.wrap(part, per_line) or [""]]
    return "\n".join(lines)


def score_panels(count: int) -> tuple[Figure, np.ndarray, tuple[float, float, float, float]]:
    """A grid of ``count`` score panels, at most 4 a row, with room for the legend on the right:
    the figure, its axes (flat) and its margins (left, right, top, bottom inches)."""
    columns = min(4, count)
    lines = math.ceil(count / columns)
    margins, gaps = (0.8, 2.4, 0.7, 0.8), (0.8, 0.9)  # right: the legend
    figure = new_figure(
        3.2 + 3.0 * columns + 0.8 * (columns - 1), 1.5 + 2.4 * lines + 0.9 * (lines - 1)
    )
    return figure, panel_grid(figure, (lines, columns), margins, gaps).ravel(), margins


def finish_panels(figure: Figure, axes: Sequence[Axes], used: int, title: str, top: float) -> None:
    """Hide the panels past the first ``used`` of a grid, then the shared legend and the title
    (:func:`legend_and_title`)."""
    for ax in axes[used:]:
        ax.set_axis_off()
    legend_and_title(figure, axes, title, top)


def legend_and_title(
    figure: Figure, axes: Iterable[Axes], title: str, top: float, legend_title: str = "method"
) -> None:
    """One legend of every line drawn in ``axes`` (each label once, in the order first drawn),
    right-aligned below the figure's top margin of ``top`` inches, and ``title`` above it.

    The figure grows where either would not fit, its panels keeping their size in inches:
    wider where the legend is wider than the space right of the panels, taller where it is
    taller than the panels (their height then stretched) or where the title, broken to the
    figure's width (:func:`fitted_title`), takes more lines than ``top`` was made for.
    """
    legend: dict[str, object] = {}
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        legend.update(zip(labels, handles, strict=True))
    width, height = figure.get_size_inches()
    key = figure.legend(legend.values(), legend.keys(), title=legend_title, loc="upper right")
    box = key.get_window_extent(figure.canvas.get_renderer())
    key_width, key_height = box.width / figure.dpi, box.height / figure.dpi
    panels_right = max(ax.get_position().x1 for ax in figure.axes) * width
    new_width = max(width, panels_right + key_width + 2 * EDGE)
    fitted = fitted_title(title, new_width)
    new_top = top + TITLE_LINE * (fitted.count("\n") - title.count("\n"))
    new_height = max(height - top + new_top, new_top + key_height + EDGE)
    if (new_width, new_height) != (width, height):
        keep_panels(figure, (width, height, top), (new_width, new_height, new_top))
    key.set_bbox_to_anchor((1, 1 - new_top / new_height), transform=figure.transFigure)
    figure.suptitle(fitted, y=1 - EDGE / new_height, va="top", fontsize=TITLE_SIZE)


def keep_panels(
    figure: Figure, old: tuple[float, float, float], new: tuple[float, float, float]
) -> None:
    """Resize ``figure`` from ``old`` to ``new`` (width, height and top margin, in inches),
    every axes keeping its left edge and width in inches; their bottom margin stays and the
    band they fill up to the top margin stretches to the new height."""
    (width, height, top), (new_width, new_height, new_top) = old, new
    bottom = min(ax.get_position().y0 for ax in figure.axes) * height
    stretch = (new_height - new_top - bottom) / (height - top - bottom)
    boxes = [(ax, ax.get_position()) for ax in figure.axes]
    figure.set_size_inches(new_width, new_height)
    for ax, box in boxes:
        y0 = bottom + (box.y0 * height - bottom) * stretch
        y1 = bottom + (box.y1 * height - bottom) * stretch
        ax.set_position(
            (
                box.x0 * width / new_width,
                y0 / new_height,
                box.width * width / new_width,
                (y1 - y0) / new_height,
            )
        )


def output(stem: Path, suffix: str) -> Path:
    """``stem`` plus ``suffix`` (``Path.with_suffix`` would cut names such as ``ratio0.5``)."""
    return stem.with_name(stem.name + suffix)


def render(job: Job) -> list[Path]:
    """Draw one figure and write it as ``<stem>.png`` and ``<stem>.pdf``; return both paths."""
    stem, draw, args = job
    figure = draw(*args)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [output(stem, suffix) for suffix in FIGURE_SUFFIXES]
    for path in paths:
        # No creation date in the PDF, so that redrawing the same data gives the same file.
        metadata = {"CreationDate": None} if path.suffix == ".pdf" else None
        figure.savefig(path, dpi=110, metadata=metadata)
    return paths


def render_all(jobs: list[Job]) -> list[Path]:
    """Render every job, in parallel over the CPUs (matplotlib is single-threaded)."""
    workers = min(os.cpu_count() or 1, len(jobs))
    if workers <= 1:
        return [path for job in jobs for path in render(job)]
    with ProcessPoolExecutor(workers) as pool:
        chunks = pool.map(render, jobs, chunksize=max(1, len(jobs) // (4 * workers)))
        return [path for paths in chunks for path in paths]
