"""Does every heuristic approximate the capacity objective? Measured on real prefills.

For a few needle and RULER prompts of the model (SmolLM2-135M-Instruct by default), one prefill
per prompt runs every method's scoring on every layer (as sweep mode does) and
:class:`capkv.analysis.unification.UnificationProbe` records:

- the Spearman correlation, per layer and KV head, between each method's token scores and
  CapKV's removal cost ``-log(1 - s_i)``, the relevance ``w_i``, ``w_i ||v_i||^2`` and the
  leverage alone (``tau = 0``);
- the log-det capacity each method's kept set retains against a greedy forward selection on the
  objective at the same size, per layer and KV head.

It writes ``agreement.csv|md`` and ``optimum.csv|md`` under ``--results`` and two figures under
``--plots``; the optimum table joins each method's task score from ``results/scores.csv`` (the
committed sweep results) where that cell exists.

    .venv/bin/python scripts/unification.py --threads 1   # the numbers of docs/results.md, about 50 min
    .venv/bin/python scripts/unification.py --redraw      # tables and figures from the saved rows
    .venv/bin/python scripts/unification.py --calibrate   # the greedy's speed on this machine
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tqdm import tqdm
from transformers import DynamicCache

from capkv import Budget
from capkv.analysis.unification import (
    REFERENCES,
    UnificationProbe,
    check_greedy_cost,
    greedy_capacity,
    greedy_seconds,
)
from capkv.engine.compression import record_kept
from capkv.figures.canvas import new_figure
from capkv.figures.style import method_style
from capkv.harness.cli import CONF_DIR
from capkv.harness.runner import prefill, prefill_ids, prepared_examples
from capkv.results.format import markdown
from capkv.storage.files import write_atomically

PROTOCOL = "query_aware"
SCORE_OF_TASK = {"needle_grid": "exact", "ruler": "string_match_all"}
# PyramidKV scores tokens exactly as SnapKV does (only its per-layer budgets differ), so it is
# measured in the optimum table but not repeated in the agreement table.
SAME_SCORES_AS = {"pyramidkv": "snapkv"}
CORRELATION_DIGITS = dict.fromkeys(REFERENCES, 2)  # other floats print with one decimal
REFERENCE_TITLES = {
    "removal_cost": "CapKV's removal cost -log(1 - s_i)",
    "relevance": "relevance w_i",
    "relevance_norm": "w_i ||v_i||^2",
    "leverage": "leverage alone (tau = 0)",
}


def calibrate() -> float:
    """Multiply-adds per second of the greedy selection on this machine."""
    values = torch.randn(3, 2048, 64)
    weights = torch.rand(3, 3, 2048)
    greedy_capacity(values, weights, 16)  # warm-up
    start = time.perf_counter()
    greedy_capacity(values, weights, 256)
    seconds = time.perf_counter() - start
    return greedy_seconds(1, 3, 3, 2048, 256, 64) * 2.0e9 / seconds


def spread(items: list, count: int) -> list:
    """``count`` items evenly spread over ``items`` (all when there are fewer)."""
    if count >= len(items):
        return items
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def load(model_name: str, task_name: str, task_overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config", overrides=[f"model={model_name}", f"task={task_name}", *task_overrides]
        )
    model, tokenizer = instantiate(cfg.model).load()
    return model, tokenizer, instantiate(cfg.task)


def method_of(name: str):
    return instantiate(OmegaConf.load(CONF_DIR / "method" / f"{name}.yaml"))


def measure_task(model, tokenizer, task, task_name: str, args) -> tuple[list[dict], list[dict]]:
    methods = {name: method_of(name) for name in args.methods}
    budgets = [Budget(ratio=r) for r in args.ratios]
    cells = [(name, b.label) for name in methods for b in budgets]
    selections = [(methods[name], b) for name in methods for b in budgets]
    scored = {n: m for n, m in methods.items() if n not in SAME_SCORES_AS}
    examples = spread(prepared_examples(model, tokenizer, task).prepared, args.prompts)
    config = model.config
    layers = args.layers or list(range(config.num_hidden_layers))
    longest = max(prompt.length for _, prompt in examples)
    seconds = greedy_seconds(
        len(layers),
        config.num_key_value_heads,
        config.num_attention_heads // config.num_key_value_heads,
        longest,
        max(b.n_kept(longest) for b in budgets),
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
    )
    check_greedy_cost(seconds, args.max_greedy_minutes)
    agreement, optimum = [], []
    for example, prompt in tqdm(examples, desc=f"{task_name} prompts", unit="prompt"):
        probe = UnificationProbe(scored, cells, layers=layers)
        with record_kept(model, selections, probe.on_layer):
            prefill(model, prefill_ids(prompt, PROTOCOL), DynamicCache())
        context = {
            "task": task_name,
            "example_id": example.example_id,
            "subtask": example.metadata.get("subtask") or "",
            "prompt_tokens": prompt.length,
        }
        agreement += [{**context, **row} for row in probe.agreement]
        optimum += [{**context, **row} for row in probe.optimum]
    return agreement, optimum


def agreement_summary(agreement: pd.DataFrame) -> pd.DataFrame:
    """Method x reference: mean Spearman over prompts, layers and KV heads, per task and all."""
    frames = [agreement.assign(task="all"), agreement]
    table = (
        pd.concat(frames)
        .groupby(["task", "method", "reference"])["spearman"]
        .mean()
        .unstack("reference")[list(REFERENCES)]
        .reset_index()
    )
    table.columns.name = None
    return table


def optimum_summary(optimum: pd.DataFrame, scores_csv: Path, model: str) -> pd.DataFrame:
    """Method x budget: fraction of the greedy capacity kept (mean over prompts, layers, heads),
    beside the cell's task score in the committed sweep results."""
    fraction = optimum.assign(fraction=optimum["capacity"] / optimum["greedy_capacity"])
    table = (
        fraction.groupby(["task", "method", "budget"])
        .agg(fraction_of_greedy=("fraction", "mean"), kept_tokens=("kept", "mean"))
        .reset_index()
    )
    table["fraction_of_greedy"] *= 100
    table["task_score"] = float("nan")
    if scores_csv.exists():
        scores = pd.read_csv(scores_csv)
        scores = scores[
            (scores["model"] == model)
            & (scores["subtask"] == "average")
            & (scores["protocol"] == PROTOCOL)
        ]
        scores = scores[scores["metric"] == scores["task"].map(SCORE_OF_TASK)]
        table = (
            table.drop(columns="task_score")
            .merge(
                scores[["task", "method", "budget", "score"]],
                on=["task", "method", "budget"],
                how="left",
            )
            .rename(columns={"score": "task_score"})
        )
    return table


def agreement_figure(agreement: pd.DataFrame, title: str):
    """One panel per reference: mean Spearman per layer, one line per method."""
    figure = new_figure(4.2 * len(REFERENCES), 3.8)
    axes = figure.subplots(1, len(REFERENCES), sharey=True)
    means = agreement.groupby(["reference", "method", "layer"])["spearman"].mean()
    for ax, reference in zip(axes, REFERENCES, strict=True):
        for method in agreement["method"].unique():
            series = means[reference][method]
            ax.plot(series.index, series.values, **method_style(method))
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_title(REFERENCE_TITLES[reference], fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylim(-1, 1)
    axes[0].set_ylabel("Spearman correlation (mean over heads and prompts)")
    axes[-1].legend(fontsize=8, loc="lower right")
    figure.suptitle(title)
    return figure


def optimum_figure(table: pd.DataFrame, title: str, ratios: list[float]):
    """Fraction of the greedy capacity kept against the task score, one panel per task; each
    point is labelled with its ratio (``ratios``: those measured)."""
    ratio_of = {Budget(ratio=ratio).label: ratio for ratio in ratios}
    # Panels for the tasks with scores in the main results (every task when none has any).
    scored = [
        t
        for t in table["task"].unique()
        if table.loc[table["task"] == t, "task_score"].notna().any()
    ]
    tasks = scored or list(table["task"].unique())
    figure = new_figure(5.0 * max(len(tasks), 1), 4.2)
    axes = figure.subplots(1, max(len(tasks), 1), squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=False):
        rows = table[table["task"] == task]
        for method, group in rows.groupby("method"):
            style = method_style(method)
            ax.plot(
                group["fraction_of_greedy"],
                group["task_score"],
                marker=style["marker"] or "o",
                linestyle="none",
                color=style["color"],
                label=style["label"],
            )
            for _, row in group.iterrows():
                ax.annotate(
                    f"{ratio_of[row['budget']]:.0%}",
                    (row["fraction_of_greedy"], row["task_score"]),
                    fontsize=7,
                )
        ax.set_title(f"{task} ({SCORE_OF_TASK[task]})", fontsize=10)
        ax.set_xlabel("capacity kept, % of greedy selection's (labels: prompt removed)")
        ax.set_ylabel("task score (0-100)")
        ax.legend(fontsize=8)
    figure.suptitle(title)
    return figure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="conf/model name")
    parser.add_argument("--tasks", nargs="+", default=["needle_grid", "ruler"])
    parser.add_argument(
        "--task-overrides",
        nargs="*",
        default=["ruler:task.context_lengths=[4096]", "ruler:task.num_examples=1"],
        help="Hydra overrides of the tasks, e.g. task.context_lengths=[2048]; "
        "ruler:task.num_examples=1 applies to one task only (default: one RULER prompt per "
        "subtask at 4k tokens)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--prompts", type=int, default=7, help="prompts per task, spread over the task"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["capkv", "snapkv", "pyramidkv", "h2o", "streamingllm", "random"],
    )
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="layers measured (all)")
    parser.add_argument("--max-greedy-minutes", type=float, default=30.0)
    parser.add_argument("--results", type=Path, default=Path("results/unification"))
    parser.add_argument("--scores", type=Path, default=Path("results/scores.csv"))
    parser.add_argument("--plots", type=Path, default=Path("plots/unification"))
    parser.add_argument(
        "--redraw",
        action="store_true",
        help="rebuild the tables and figures from the rows under --results, without a model",
    )
    parser.add_argument(
        "--calibrate", action="store_true", help="print the greedy's speed and exit"
    )
    args = parser.parse_args(argv)
    if args.calibrate:
        print(f"greedy selection: {calibrate():.3g} multiply-adds per second")
        return
    if not args.redraw:
        for name, frame in zip(("agreement_rows", "optimum_rows"), measure(args), strict=True):
            text = frame.to_csv(index=False, float_format="%.6g")
            write_atomically(args.results / f"{name}.csv", text)
    # Tables and figures always come from the saved rows, so --redraw reproduces them exactly.
    agreement_frame = pd.read_csv(args.results / "agreement_rows.csv")
    optimum_frame = pd.read_csv(args.results / "optimum_rows.csv")
    summary = agreement_summary(agreement_frame)
    optimum_table = optimum_summary(optimum_frame, args.scores, args.model)
    for name, frame in [("agreement", summary), ("optimum", optimum_table)]:
        write_atomically(args.results / f"{name}.csv", frame.to_csv(index=False))
        write_atomically(args.results / f"{name}.md", markdown(frame, CORRELATION_DIGITS))
    draw(agreement_frame, optimum_table, args)
    print(markdown(summary, CORRELATION_DIGITS))
    print(markdown(optimum_table))


def measure(args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Agreement and optimum rows of every task's prompts."""
    if args.threads:
        torch.set_num_threads(args.threads)
    agreement, optimum = [], []
    for task_name in args.tasks:
        try:
            overrides = [
                o.partition(":")[2] if ":" in o.split("=")[0] else o
                for o in args.task_overrides
                if ":" not in o.split("=")[0] or o.startswith(f"{task_name}:")
            ]
            model, tokenizer, task = load(args.model, task_name, overrides)
            task_agreement, task_optimum = measure_task(model, tokenizer, task, task_name, args)
        except ValueError as error:
            sys.exit(f"error: {error}")
        agreement += task_agreement
        optimum += task_optimum
    return pd.DataFrame(agreement), pd.DataFrame(optimum)


def draw(agreement_frame: pd.DataFrame, optimum_table: pd.DataFrame, args) -> None:
    """The two figures, as PNG under ``--plots``."""
    args.plots.mkdir(parents=True, exist_ok=True)
    prompts = f"{args.model}, {len(agreement_frame['example_id'].unique())} prompts"
    for stem, figure in [
        (
            "agreement_by_layer",
            agreement_figure(
                agreement_frame, f"Rank agreement with the objective's terms ({prompts})"
            ),
        ),
        (
            "capacity_vs_score",
            optimum_figure(
                optimum_table,
                f"Distance to the objective's greedy optimum and task score ({prompts})",
                args.ratios,
            ),
        ),
    ]:
        figure.savefig(args.plots / f"{stem}.png", dpi=130, bbox_inches="tight")


if __name__ == "__main__":
    main()
