"""Figures and per-task tables drawn from the CSVs under ``results/`` alone (``make figures``).

    python -m capkv.figures [--results results] [--plots plots]

Refreshes ``results/*.csv`` from ``results/runs`` when that folder exists
(:func:`capkv.results.aggregate`), then writes under ``plots/`` (every figure as PNG and PDF):

- ``heatmaps/<model>_<task>_<protocol>_<method>_<budget>_<score>``: one needle heatmap per run and
  score (x = context length, y = needle depth, cell = mean score in [0, 1]);
- ``<model>_<task>_<protocol>_<score>_heatmaps``: those heatmaps as one grid, methods as rows and
  budgets as columns, the full cache on top;
- ``<model>_<task>_<protocol>_<metric>_vs_tokens`` and ``..._vs_ratio``: score against budget, one
  line per method and one panel per task family (LongBench's and RULER's groups of subtasks) plus
  the average, the full cache as a dashed black line;
- ``<model>_<task>_<protocol>_table.md`` and ``.csv``: (method, budget, metric) rows, subtasks and
  the average as columns.

Each method keeps one colour in every figure; CapKV is drawn red, thick and on top. A figure
whose data (and this module) did not change since it was drawn is not drawn again
(``plots/.fingerprints.json``), so a rerun after a few new runs takes seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import product
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from capkv.errors import one_line_errors
from capkv.results import (
    RUN_KEYS,
    RUNS,
    aggregate,
    markdown,
    write_atomically,
)
from capkv.tasks.base import task_reporting

FULL = "full"
AVERAGE = "average"
NEEDLE_COLUMNS = [*RUN_KEYS, "context_length", "depth", "prompt_tokens"]
HOW_TO_RUN = (
    "produce results with `python run.py method=full` (the full-cache reference) and "
    "`python run.py -m method=capkv,snapkv budget=128,512`, then `make figures`."
)

# Colour, display name and marker per method (the part of the name before any "-variant").
METHODS = {
    FULL: ("#000000", "Full cache", ""),
    "capkv": ("#d62728", "CapKV", "o"),
    "snapkv": ("#1f77b4", "SnapKV", "s"),
    "pyramidkv": ("#2ca02c", "PyramidKV", "^"),
    "h2o": ("#ff7f0e", "H2O", "v"),
    "streamingllm": ("#9467bd", "StreamingLLM", "D"),
    "random": ("#7f7f7f", "Random", "x"),
}
SPARE_COLOURS = ["#8c564b", "#e377c2", "#17becf", "#bcbd22"]
VARIANT_LINESTYLES = [":", "-.", (0, (5, 1, 1, 1, 1, 1))]

# The subtask families of LongBench and RULER, in their papers' order, as their tasks report them.
FAMILY_OF = {
    subtask: family
    for target in ("capkv.tasks.longbench.LongBench", "capkv.tasks.ruler.RulerSuite")
    for subtask, family in task_reporting({"_target_": target}).families.items()
}
FAMILIES = list(dict.fromkeys(FAMILY_OF.values()))
SUBTASK_ORDER = list(FAMILY_OF)

FIGURE_SUFFIXES = (".png", ".pdf")
FINGERPRINTS = ".fingerprints.json"  # under plots/: what each figure showed when it was drawn
SOURCE = Path(__file__).read_bytes()

HEATMAP_NORM = Normalize(vmin=0.0, vmax=1.0)
HEATMAP_CMAP = "RdYlGn"


# ----------------------------------------------------------------------------- names and order


def safe_name(*parts: object) -> str:
    """File name from parts joined by ``_``; anything but letters, digits, ``_.+-`` becomes ``-``."""
    return "_".join(re.sub(r"[^A-Za-z0-9_.+-]+", "-", str(part)) for part in parts)


def parse_budget(label: str) -> tuple[str, float]:
    """``("tokens", N)`` for ``budgetN``, ``("ratio", R)`` for ``ratioR``, ``("full", nan)`` for
    ``full``; any other label is ``("other", nan)``."""
    match = re.fullmatch(r"(budget|ratio)(\d+(?:\.\d*)?(?:e-?\d+)?)", label)
    if match:
        return ("tokens" if match[1] == "budget" else "ratio"), float(match[2])
    return (FULL if label == FULL else "other"), math.nan


def budget_kind(label: str) -> str:
    """``"tokens"``, ``"ratio"``, ``"full"`` or ``"other"`` (see :func:`parse_budget`)."""
    return parse_budget(label)[0]


def budget_display(label: str) -> str:
    """``"512 tokens/head"``, ``"50% removed"``, ``"full cache"``, or the label itself."""
    kind, value = parse_budget(label)
    if kind == "tokens":
        return f"{value:g} tokens/head"
    if kind == "ratio":
        return f"{100 * value:g}% removed"
    return "full cache" if kind == FULL else label


def budget_sort_key(label: str) -> tuple[int, float, str]:
    """Full cache first, then token budgets from small to large, then ratios from the largest
    removal to the smallest (always from the tightest cache to the loosest)."""
    kind, value = parse_budget(label)
    rank = {FULL: 0, "tokens": 1, "ratio": 2}.get(kind, 3)
    return rank, -value if kind == "ratio" else value, label


def method_base(method: str) -> str:
    """``capkv`` for ``capkv`` and ``capkv-variant``."""
    return method.split("-", 1)[0]


def is_full(method: str) -> bool:
    """Whether ``method`` is the full cache (no eviction), variants included."""
    return method_base(method) == FULL


def method_sort_key(method: str) -> tuple[int, str]:
    """The full cache, then CapKV, then the baselines in a fixed order, then any other method."""
    bases = list(METHODS)
    base = method_base(method)
    return (bases.index(base) if base in bases else len(bases)), method


def method_style(method: str) -> dict[str, object]:
    """Keyword arguments of ``Axes.plot`` for ``method``: the same in every figure.

    Variants keep their method's colour and marker and get a dotted line style picked by name.
    """
    base, _, variant = method.partition("-")
    spare = SPARE_COLOURS[zlib.crc32(base.encode()) % len(SPARE_COLOURS)]
    colour, name, marker = METHODS.get(base, (spare, base, "P"))
    stands_out = base == "capkv"
    style: dict[str, object] = {
        "color": colour,
        "label": f"{name} ({variant})" if variant else name,
        "marker": marker or None,
        "linestyle": "-",
        "linewidth": 2.8 if stands_out else 1.5,
        "markersize": 7 if stands_out else 5,
        "zorder": 3 if stands_out else 2,
    }
    if variant:
        style["linestyle"] = VARIANT_LINESTYLES[
            zlib.crc32(variant.encode()) % len(VARIANT_LINESTYLES)
        ]
    return style


def subtask_sort_key(subtask: str) -> tuple[int, int, str]:
    """LongBench and RULER subtasks in their papers' order, others by name, the average last."""
    if subtask == AVERAGE:
        return 2, 0, subtask
    if subtask in FAMILY_OF:
        return 0, SUBTASK_ORDER.index(subtask), subtask
    return 1, 0, subtask


# ----------------------------------------------------------------------------- input


def read_csv(path: Path) -> pd.DataFrame:
    """The table at ``path``; empty when the file is missing or holds no rows.

    Raises
    ------
    ValueError
        If the file is not a table of runs (damaged, or not written by the harness).
    """
    try:
        frame = pd.read_csv(path)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        problem = f"is not a CSV table ({str(error).splitlines()[0]})"
    else:
        missing = [key for key in RUN_KEYS if key not in frame.columns]
        if not missing:
            return frame
        problem = f"lacks the columns {', '.join(missing)}"
    raise ValueError(
        f"{path} {problem}; delete it (the next run.py rebuilds the tables from the run folders "
        "under runs/)."
    )


def load_tables(results_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``scores.csv`` and ``needle.csv``, refreshed from ``runs/`` first when it exists."""
    if (results_dir / RUNS).is_dir():
        aggregate(results_dir)
    scores = read_csv(results_dir / "scores.csv")
    needle = read_csv(results_dir / "needle.csv")
    for frame in (scores, needle):
        if not frame.empty:
            frame[RUN_KEYS] = frame[RUN_KEYS].astype(str)
    return scores, needle


def for_protocol(frame: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """Rows of one protocol. The full cache evicts nothing, so the protocol does not change it:
    when ``protocol`` has no full-cache run, one from another protocol stands in."""
    own = frame[frame["protocol"] == protocol]
    if own["method"].map(is_full).any():
        return own
    full = frame[frame["method"].map(is_full)]
    if full.empty:
        return own
    return pd.concat([own, full[full["protocol"] == min(full["protocol"])]])


def needle_scores(needle: pd.DataFrame) -> list[str]:
    """Score columns of the needle table (``exact``, ``graded``)."""
    return [c for c in needle.columns if c not in NEEDLE_COLUMNS]


# ----------------------------------------------------------------------------- output


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


Job = tuple[Path, Callable[..., Figure], tuple[Any, ...]]  # (file stem, draw function, arguments)


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


def fingerprint(job: Job) -> str:
    """Hash of what a figure shows and of the code (this module, matplotlib) that draws it."""
    _, draw, args = job
    digest = hashlib.sha256(f"{draw.__name__} {matplotlib.__version__}".encode() + SOURCE)
    for arg in args:
        if isinstance(arg, pd.DataFrame):
            digest.update(pd.util.hash_pandas_object(arg, index=False).to_numpy().tobytes())
        else:
            digest.update(repr(arg).encode())
    return digest.hexdigest()


def render_changed(jobs: list[Job], plots_dir: Path) -> tuple[list[Path], int]:
    """Render the jobs whose figure changed since the last call (or whose files are gone).

    Returns the paths written and the number of figures kept as they were.
    """
    record = plots_dir / FINGERPRINTS
    try:
        known = json.loads(record.read_text())
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        known = {}  # no cache, or a damaged one: every figure is drawn again
    if not isinstance(known, dict):
        known = {}
    current = {job[0].relative_to(plots_dir).as_posix(): fingerprint(job) for job in jobs}
    changed = [
        job
        for job, (name, key) in zip(jobs, current.items(), strict=True)
        if known.get(name) != key
        or not all(output(job[0], suffix).exists() for suffix in FIGURE_SUFFIXES)
    ]
    written = render_all(changed)
    if jobs:
        write_atomically(record, json.dumps(current, indent=0) + "\n")
    return written, len(jobs) - len(changed)


# ----------------------------------------------------------------------------- needle heatmaps


def heatmap_grid(rows: pd.DataFrame, score: str) -> pd.DataFrame:
    """Mean ``score`` per cell: depths (%) as the index, context lengths (tokens) as columns."""
    return rows.pivot_table(index="depth", columns="context_length", values=score, aggfunc="mean")


def draw_heatmap(ax: Axes, grid: pd.DataFrame, fontsize: float) -> AxesImage:
    """``grid`` on ``ax`` with the shared 0-1 red-to-green scale, each cell's value written in."""
    values = grid.to_numpy(dtype=float)
    image = ax.imshow(values, cmap=HEATMAP_CMAP, norm=HEATMAP_NORM, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [f"{length:g}" for length in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [f"{depth:g}" for depth in grid.index])
    ax.tick_params(labelsize=fontsize)
    for (row, column), value in np.ndenumerate(values):
        if not math.isnan(value):
            colour = "white" if value < 0.2 or value > 0.85 else "black"
            ax.text(
                column,
                row,
                f"{value:.2g}",
                ha="center",
                va="center",
                color=colour,
                fontsize=fontsize,
            )
    return image


def score_label(score: str) -> str:
    """Colour bar label of a needle score."""
    return {"exact": "exact match (0-1)", "graded": "graded score (0-1)"}.get(score, score)


def heatmap_layout(runs: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Rows (methods, the full cache first) and columns (budgets) of a heatmap grid."""
    methods = sorted(runs["method"].unique(), key=method_sort_key)
    budgets = [b for b in runs["budget"].unique() if b != FULL]
    return methods, sorted(budgets, key=budget_sort_key) or [FULL]


def fitted_title(title: str, width: float, fontsize: float = 11.0) -> str:
    """``title``, broken after its first colon when one line would be wider than ``width``
    inches (a character is taken as 0.55 em, wide for DejaVu Sans' average)."""
    if len(title) * 0.55 * fontsize / 72 <= width - 0.2:
        return title
    head, colon, tail = title.partition(": ")
    return f"{head}:\n{tail}" if colon else title


def heatmap_figure(rows: pd.DataFrame, score: str, title: str) -> Figure:
    """Needle heatmaps of ``rows``, methods as rows and budgets as columns (a single run gives a
    single panel); the full cache sits in the first column of its row. One colour bar."""
    methods, budgets = heatmap_layout(rows[["method", "budget"]])
    depths = sorted(rows["depth"].unique())
    lengths = sorted(rows["context_length"].unique())
    single = len(methods) == len(budgets) == 1
    cell = (0.75, 0.45) if single else (0.5, 0.3)
    panel = (max(2.4, cell[0] * len(lengths)), max(1.4, cell[1] * len(depths)))
    left, right, bottom, gaps = 1.2, 1.3, 0.75, (0.15, 0.35)
    width = left + right + (panel[0] + gaps[0]) * len(budgets) - gaps[0]
    title = fitted_title(title, width)
    margins = (left, right, bottom, 0.8 + 0.2 * title.count("\n"))
    height = margins[2] + margins[3] + (panel[1] + gaps[1]) * len(methods) - gaps[1]
    figure = new_figure(width, height)
    axes = panel_grid(figure, (len(methods), len(budgets)), margins, gaps)
    fontsize = 9.0 if single else max(5.5, 9.0 - 0.4 * len(lengths))
    for (i, method), (j, budget) in product(enumerate(methods), enumerate(budgets)):
        run = rows[rows["method"] == method]
        run = run if is_full(method) else run[run["budget"] == budget]
        if run.empty or (is_full(method) and j > 0):
            axes[i, j].set_axis_off()
            continue
        grid = heatmap_grid(run, score).reindex(index=depths, columns=lengths)
        image = draw_heatmap(axes[i, j], grid, fontsize)
        axes[i, j].set_title(budget_display(run["budget"].iloc[0]), fontsize=9)
        axes[i, j].tick_params(labelbottom=i == len(methods) - 1, labelleft=j == 0)
    label_rows(axes[:, 0], methods)
    figure.supxlabel("context length (tokens)", y=0.2 / height, va="bottom")
    figure.suptitle(title, y=1 - 0.15 / height, va="top", fontsize=11)
    colour_bar = figure.add_axes((1 - 0.95 / width, 0.15, 0.2 / width, 0.7))
    figure.colorbar(image, cax=colour_bar, label=score_label(score))
    return figure


def label_rows(axes: np.ndarray, methods: list[str]) -> None:
    """The depth axis label and, left of it, the method's name in bold, on each row."""
    for ax, method in zip(axes, methods, strict=True):
        ax.set_ylabel("needle depth (%)", fontsize=8)
        name = method_style(method)["label"]
        ax.annotate(
            name,
            (0, 0.5),
            xycoords="axes fraction",
            xytext=(-42, 0),
            textcoords="offset points",
            rotation=90,
            ha="right",
            va="center",
            fontsize=10,
            fontweight="bold",
        )


def heatmap_jobs(needle: pd.DataFrame, plots_dir: Path) -> Iterator[Job]:
    """One heatmap per needle run and score, under ``heatmaps/``."""
    for (model, task, method, budget, protocol), rows in needle.groupby(RUN_KEYS):
        for score in needle_scores(needle):
            title = f"Needle in a haystack, {score_label(score)}: {model} · {task} · {protocol}"
            stem = plots_dir / "heatmaps" / safe_name(model, task, protocol, method, budget, score)
            yield stem, heatmap_figure, (rows, score, title)


def heatmap_grid_jobs(needle: pd.DataFrame, plots_dir: Path) -> Iterator[Job]:
    """One methods x budgets grid per (model, task, protocol) and score."""
    for (model, task), task_rows in needle.groupby(["model", "task"]):
        for protocol in sorted(task_rows["protocol"].unique()):
            rows = for_protocol(task_rows, protocol)
            for score in needle_scores(needle):
                title = f"Needle in a haystack, {score_label(score)}: {model} · {task} · {protocol}"
                stem = plots_dir / safe_name(model, task, protocol, score, "heatmaps")
                yield stem, heatmap_figure, (rows, score, title)


# ----------------------------------------------------------------------------- score vs budget


def family_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """Score per run, metric and panel: one per task family (mean over its subtasks) and the
    average; a task without subtasks is its own single panel."""
    keys = [*RUN_KEYS, "metric"]
    subtasks = scores[scores["subtask"] != AVERAGE]
    per_family = subtasks.assign(panel=subtasks["subtask"].map(lambda s: FAMILY_OF.get(s, s)))
    per_family = per_family.groupby([*keys, "panel"], as_index=False)["score"].mean()
    average = scores[scores["subtask"] == AVERAGE]
    has_subtasks = average["task"].isin(subtasks["task"])
    several = per_family.groupby("task")["panel"].nunique()
    panels = [
        per_family,
        average[~has_subtasks].assign(panel=average.loc[~has_subtasks, "task"]),
        average[average["task"].map(several).fillna(0) > 1].assign(panel=AVERAGE),
    ]
    return pd.concat(panels, ignore_index=True)[[*keys, "panel", "score"]]


def panel_sort_key(panel: str) -> tuple[int, int, str]:
    """Families in LongBench's and RULER's order, then other panels by name, the average last."""
    families = list(FAMILIES)
    if panel == AVERAGE:
        return 2, 0, panel
    return (0, families.index(panel), panel) if panel in families else (1, 0, panel)


def draw_curves(ax: Axes, rows: pd.DataFrame) -> None:
    """One line per evicting method (x = budget value) and the full cache as a horizontal line."""
    for method in sorted(rows["method"].unique(), key=method_sort_key):
        method_rows = rows[rows["method"] == method]
        style = method_style(method)
        if is_full(method):
            ax.axhline(method_rows["score"].mean(), **{**style, "linestyle": "--", "marker": None})
            continue
        points = method_rows.assign(x=method_rows["budget"].map(budget_x)).sort_values("x")
        ax.plot(points["x"], points["score"], **style)


def budget_x(label: str) -> float:
    """Where a budget sits on the x axis: tokens per KV head, or the percentage removed."""
    kind, value = parse_budget(label)
    return 100 * value if kind == "ratio" else value


def format_budget_axis(ax: Axes, budgets: list[str], kind: str) -> None:
    """Ticks at the budgets that were run; a log2 axis for token budgets."""
    values = sorted({budget_x(b) for b in budgets})
    if kind == "tokens":
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens kept per KV head (log2 scale)")
    else:
        ax.set_xlabel("prompt tokens removed (%)")
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.minorticks_off()


def curve_figure(rows: pd.DataFrame, kind: str, metric: str, title: str) -> Figure:
    """Score against budget, one panel per family and the average, one shared legend."""
    panels = sorted(rows["panel"].unique(), key=panel_sort_key)
    columns = min(4, len(panels))
    lines = math.ceil(len(panels) / columns)
    margins, gaps = (0.8, 2.0, 0.7, 0.8), (0.8, 0.9)
    figure = new_figure(
        2.8 + 3.0 * columns + 0.8 * (columns - 1), 1.5 + 2.4 * lines + 0.9 * (lines - 1)
    )
    axes = panel_grid(figure, (lines, columns), margins, gaps).ravel()
    budgets = list(rows.loc[rows["kind"] == kind, "budget"])
    legend: dict[str, object] = {}
    for ax, panel in zip(axes, panels, strict=False):
        draw_curves(ax, rows[rows["panel"] == panel])
        format_budget_axis(ax, budgets, kind)
        ax.set_title("Average over subtasks" if panel == AVERAGE else panel)
        ax.set_ylabel(f"{metric} (0-100)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        legend.update(zip(labels, handles, strict=True))
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    height = figure.get_figheight()
    figure.legend(
        legend.values(),
        legend.keys(),
        title="method",
        loc="upper right",
        bbox_to_anchor=(1, 1 - margins[3] / height),
    )
    figure.suptitle(title, y=1 - 0.12 / height, va="top", fontsize=11)
    return figure


def curve_jobs(scores: pd.DataFrame, plots_dir: Path) -> Iterator[Job]:
    """One score-against-budget figure per (model, task, protocol, budget kind, metric)."""
    families = family_scores(scores)
    families["kind"] = families["budget"].map(budget_kind)
    for (model, task), task_rows in families.groupby(["model", "task"]):
        for protocol in sorted(task_rows["protocol"].unique()):
            rows = for_protocol(task_rows, protocol)
            for kind, axis in [("tokens", "token budget"), ("ratio", "compression ratio")]:
                if not (rows["kind"] == kind).any():
                    continue
                for (metric,), curves in rows[rows["kind"].isin([kind, FULL])].groupby(["metric"]):
                    title = f"{metric} against {axis}: {model} · {task} · {protocol}"
                    stem = plots_dir / safe_name(model, task, protocol, metric, "vs", kind)
                    yield stem, curve_figure, (curves, kind, metric, title)


# ----------------------------------------------------------------------------- capacity


def capacity_figure(rows: pd.DataFrame, metric: str, title: str) -> Figure:
    """Task score against the retained log-det capacity and against the attention error.

    One point per (method, budget), coloured by method; CapKV's objective on the left, the
    relative attention-output error on the right.
    """
    figure = new_figure(11.5, 4.4)
    axes = panel_grid(figure, (1, 2), (0.8, 1.9, 0.7, 0.7), (0.9, 0.0)).ravel()
    panels = [
        ("capacity_fraction", "retained log-det capacity (fraction of the full cache's)"),
        ("attention_error", "relative attention-output error vs full cache"),
    ]
    legend: dict[str, object] = {}
    for ax, (column, label) in zip(axes, panels, strict=True):
        for method in sorted(rows["method"].unique(), key=method_sort_key):
            points = rows[rows["method"] == method]
            style = method_style(method)
            ax.scatter(
                points[column],
                points["score"],
                color=style["color"],
                marker=style["marker"] or "o",
                label=style["label"],
                s=48 if method_base(method) == "capkv" else 30,
                zorder=style["zorder"],
            )
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric} (0-100)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        legend.update(zip(labels, handles, strict=True))
    figure.legend(legend.values(), legend.keys(), title="method", loc="upper right")
    figure.suptitle(title, fontsize=11)
    return figure


def capacity_jobs(scores: pd.DataFrame, plots_dir: Path) -> Iterator[Job]:
    """One capacity figure per (model, task, protocol, metric) whose runs carry diagnostics."""
    if "capacity_fraction" not in scores:
        return
    measured = scores[(scores["subtask"] == AVERAGE) & scores["capacity_fraction"].notna()]
    for (model, task, protocol, metric), rows in measured.groupby(
        ["model", "task", "protocol", "metric"]
    ):
        title = f"{metric} against what the kept tokens retain: {model} · {task} · {protocol}"
        stem = plots_dir / safe_name(model, task, protocol, metric, "capacity")
        yield stem, capacity_figure, (rows, metric, title)


# ----------------------------------------------------------------------------- tables


def task_table(rows: pd.DataFrame) -> pd.DataFrame:
    """(method, budget, metric) rows; subtasks, then the average, as columns."""
    table = rows.pivot_table(
        index=["method", "budget", "metric"], columns="subtask", values="score", aggfunc="mean"
    )
    table = table[sorted(table.columns, key=subtask_sort_key)]
    order = sorted(
        table.index, key=lambda key: (method_sort_key(key[0]), budget_sort_key(key[1]), key[2])
    )
    table = table.loc[order].reset_index()
    table.columns.name = None
    return table


def task_tables(scores: pd.DataFrame, plots_dir: Path) -> list[Path]:
    """``<model>_<task>_<protocol>_table.md`` and ``.csv`` per (model, task, protocol)."""
    written = []
    for (model, task), task_rows in scores.groupby(["model", "task"]):
        for protocol in sorted(task_rows["protocol"].unique()):
            table = task_table(for_protocol(task_rows, protocol))
            stem = plots_dir / safe_name(model, task, protocol, "table")
            heading = f"# {model} · {task} · {protocol} (scores 0-100)\n\n"
            write_atomically(output(stem, ".md"), heading + markdown(table))
            write_atomically(output(stem, ".csv"), table.to_csv(index=False))
            written += [output(stem, ".md"), output(stem, ".csv")]
    return written


# ----------------------------------------------------------------------------- entry point


def draw_all(results_dir: str | Path, plots_dir: str | Path) -> tuple[list[Path], int]:
    """Every figure and table that the results allow.

    Returns the paths written and the number of figures left as they were (their data and this
    module are unchanged since they were drawn).
    """
    results_dir, plots_dir = Path(results_dir), Path(plots_dir)
    scores, needle = load_tables(results_dir)
    jobs: list[Job] = []
    if not needle.empty:
        jobs += [*heatmap_grid_jobs(needle, plots_dir), *heatmap_jobs(needle, plots_dir)]
    if not scores.empty:
        jobs += [*curve_jobs(scores, plots_dir), *capacity_jobs(scores, plots_dir)]
    written, kept = render_changed(jobs, plots_dir)
    return written + (task_tables(scores, plots_dir) if not scores.empty else []), kept


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m capkv.figures [--results results] [--plots plots]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="results folder (default: results)")
    parser.add_argument("--plots", default="plots", help="output folder (default: plots)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    with one_line_errors():
        written, kept = draw_all(args.results, args.plots)
    if not written:
        print(f"Nothing to draw: no results under {args.results}/; {HOW_TO_RUN}")
        return
    unchanged = f" ({kept} unchanged figures left as they were)" if kept else ""
    print(f"Wrote {len(written)} files under {args.plots}/{unchanged}:")
    for path in written:
        print(f"  {path}")


if __name__ == "__main__":
    main()
