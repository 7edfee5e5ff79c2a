"""Compress once, ask many: one prefill per context against one prefill per question.

On SmolLM2-135M-Instruct (CPU) and needle contexts hiding ``--questions`` keyed needles (4 by
default) at ``--tokens`` tokens (4096), each method at a budget of 512 tokens answers every
question two ways, one after the other in this process:

- ``protocol=shared_context`` (:func:`capkv.harness.shared_context.run_shared_cell`): each context
  prefilled and compressed once, each question fed after the compressed cache and cropped off;
- ``protocol=context_only`` (:func:`capkv.harness.runner.run_cell`): the context prefilled and
  compressed again for every question, which is what a harness of one question per prompt does.

The answers must be the same (each cropped turn sees exactly the context-only cache); the script
checks it. It prints the wall time of the two whole runs, and of their prefills alone (the same
prefills with eviction, timed without decoding), with their ratios. One untimed prefill with
eviction per method comes first, so that neither mode pays the process's first-call costs.

    .venv/bin/python scripts/bench_shared_context.py [--tokens 4096] [--questions 4] [--depths 0 50]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from baselines import SnapKV
from capkv import Budget, CapKV, evict
from capkv.harness.runner import Cell, prefill, prepared_examples, run_cell
from capkv.harness.shared_context import context_groups, run_shared_cell
from capkv.models import load_model
from capkv.results.store import finished_rows
from capkv.tasks.needle import NeedleTask

BUDGET = Budget(tokens=512)


def methods() -> dict[str, object]:
    return {"capkv": CapKV(), "snapkv": SnapKV()}


def cell(folder: Path, name: str, method: object, protocol: str) -> Cell:
    identity = {"model": "smollm2-135m", "task": "needle", "method": name, "budget": "b512"}
    return Cell(method, BUDGET, folder / name, {**identity, "protocol": protocol})


def time_runs(model, tokenizer, task, folder: Path) -> dict[str, float]:
    """Wall time of every method's whole run under each protocol."""
    seconds = {}
    for protocol, run in (("shared_context", run_shared_cell), ("context_only", run_cell)):
        start = time.perf_counter()
        for name, method in methods().items():
            run(model, tokenizer, task, cell(folder / protocol, name, method, protocol), protocol)
        seconds[protocol] = time.perf_counter() - start
    return seconds


def time_prefills(model, tokenizer, task) -> dict[str, float]:
    """Wall time of the prefills with eviction alone: one per context, one per question."""
    prepared = prepared_examples(model, tokenizer, task).prepared
    contexts = [group.questions[0][1].context_ids for group in context_groups(prepared)]
    questions = [prompt.context_ids for _, prompt in prepared]
    seconds = {}
    for mode, inputs in (("shared_context", contexts), ("context_only", questions)):
        start = time.perf_counter()
        for method in methods().values():
            for input_ids in inputs:
                with evict(model, method, budget=BUDGET):
                    prefill(model, input_ids, DynamicCache())
        seconds[mode] = time.perf_counter() - start
    return seconds


def same_answers(folder: Path) -> bool:
    def answers(protocol: str) -> dict[tuple[str, str], str]:
        return {
            (name, row["example_id"]): row["prediction"]
            for name in methods()
            for row in finished_rows(folder / protocol / name)
        }

    return answers("shared_context") == answers("context_only")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="needle context length")
    parser.add_argument("--questions", type=int, default=4, help="needles (questions) per context")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 50.0])
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m", dtype="float32", attn_implementation="sdpa")
    task = NeedleTask(context_lengths=[args.tokens], depths=args.depths, num_needles=args.questions)
    _, prompt = prepared_examples(model, tokenizer, task).prepared[0]
    for method in methods().values():  # warm-up: every method's first-call costs, untimed
        with evict(model, method, budget=BUDGET):
            prefill(model, prompt.context_ids, DynamicCache())
    with tempfile.TemporaryDirectory() as tmp:
        runs = time_runs(model, tokenizer, task, Path(tmp))
        same = same_answers(Path(tmp))
    prefills = time_prefills(model, tokenizer, task)
    contexts = len(args.depths)
    print(
        f"\nSmolLM2-135M-Instruct, needle at {args.tokens} tokens, {contexts} context(s) x "
        f"{args.questions} questions, CapKV and SnapKV at 512 tokens, CPU "
        f"({torch.get_num_threads()} threads)"
    )
    print("| mode | prefills (s) | whole run (s) |\n|---|---:|---:|")
    for mode, label in (
        ("shared_context", "one prefill per context (protocol=shared_context)"),
        ("context_only", "one prefill per question (protocol=context_only)"),
    ):
        print(f"| {label} | {prefills[mode]:.1f} | {runs[mode]:.1f} |")
    print(
        f"| x (per question / per context) | {prefills['context_only'] / prefills['shared_context']:.2f}"
        f" | {runs['context_only'] / runs['shared_context']:.2f} |"
    )
    print(f"\nanswers identical in the two modes: {same}")


if __name__ == "__main__":
    main()
