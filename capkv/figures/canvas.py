"""Making and writing figures: a figure on the Agg canvas, a fixed grid of panels, a shared
legend and title, and the rendering of many figures in parallel, each as PNG and PDF."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

FIGURE_SUFFIXES = (".png", ".pdf")

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


def legend_and_title(figure: Figure, axes: Iterable[Axes], title: str, top: float) -> None:
    """One legend of every line drawn in ``axes`` (each label once, in the order first drawn),
    right-aligned below the figure's top margin of ``top`` inches, and ``title`` above it."""
    legend: dict[str, object] = {}
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        legend.update(zip(labels, handles, strict=True))
    height = figure.get_figheight()
    figure.legend(
        legend.values(),
        legend.keys(),
        title="method",
        loc="upper right",
        bbox_to_anchor=(1, 1 - top / height),
    )
    figure.suptitle(title, y=1 - 0.12 / height, va="top", fontsize=11)


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
