"""Wall time of a 5 methods x 4 budgets sweep: sweep mode, separate runs per cell, and kvpress.

On SmolLM2-135M-Instruct (CPU) and the needle task (4k tokens by default), the same 20 cells are run
three ways, one after the other in this process:

- sweep mode (``methods=[...] ratios=[...]``): one prefill per example, every cell decoded
  from its own gathered cache;
- separate runs: one prefill with eviction per cell and example (what ``python run.py -m``
  does);
- kvpress: its presses (CapPress, SnapKVPress, PyramidKVPress, ObservedAttentionPress for H2O,
  which needs eager attention, StreamingLLMPress) around one prefill per cell and example,
  followed by the same greedy decoding.

Ratios are used as budgets because kvpress only takes ratios. One untimed prefill per model
comes first, so that no mode pays the process's first-call costs. The script prints the times and
their ratios, and checks that sweep mode wrote exactly the separate runs' predictions.

    .venv/bin/python scripts/bench_sweep.py [--tokens 4096] [--depths 50]

Target (issue 4): sweep mode at least 8x faster than separate runs and than kvpress.

With ``--decode-batch`` it times sweep mode twice instead, its cells decoded one by one and as
padded batches (``decode_batch=true``), and says whether the predictions are identical.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from baselines import H2O, PyramidKV, SnapKV, StreamingLLM
from capkv import Budget, CapKV
from capkv.harness.runner import (
    Cell,
    answer_under,
    prefill,
    prefill_ids,
    prepared_examples,
    run_cell,
)
from capkv.harness.sweep import run_sweep
from capkv.models import load_model
from capkv.results.store import finished_rows
from capkv.tasks.needle import NeedleTask

RATIOS = (0.25, 0.5, 0.75, 0.9)
PROTOCOL = "query_aware"


def our_methods() -> dict[str, object]:
    """The five methods with their conf/method defaults."""
    return {
        "capkv": CapKV(),
        "snapkv": SnapKV(),
        "pyramidkv": PyramidKV(),
        "h2o": H2O(),
        "streamingllm": StreamingLLM(),
    }


def kvpress_presses(ratio: float) -> dict[str, object]:
    import kvpress

    return {
        "capkv": kvpress.CapPress(compression_ratio=ratio),
        "snapkv": kvpress.SnapKVPress(compression_ratio=ratio, window_size=32, kernel_size=7),
        "pyramidkv": kvpress.PyramidKVPress(compression_ratio=ratio, window_size=32, kernel_size=7),
        "h2o": kvpress.ObservedAttentionPress(compression_ratio=ratio),
        "streamingllm": kvpress.StreamingLLMPress(compression_ratio=ratio),
    }


def identity(name: str, budget: Budget) -> dict[str, str]:
    return {
        "model": "smollm2-135m",
        "task": "needle",
        "method": name,
        "budget": budget.label,
        "protocol": PROTOCOL,
    }


def time_sweep(model, tokenizer, task, folder: Path, decode_batch: bool = False) -> float:
    cells = [
        Cell(method, Budget(ratio=r), folder / f"{n}-{r}", identity(n, Budget(ratio=r)))
        for n, method in our_methods().items()
        for r in RATIOS
    ]
    start = time.perf_counter()
    run_sweep(model, tokenizer, task, cells, PROTOCOL, decode_batch=decode_batch)
    return time.perf_counter() - start


def time_separate(model, tokenizer, task, folder: Path) -> float:
    start = time.perf_counter()
    for name, method in our_methods().items():
        for ratio in RATIOS:
            budget = Budget(ratio=ratio)
            cell = Cell(method, budget, folder / f"{name}-{ratio}", identity(name, budget))
            run_cell(model, tokenizer, task, cell, PROTOCOL)
    return time.perf_counter() - start


def time_kvpress(model, eager_model, tokenizer, task) -> float:
    examples = prepared_examples(model, tokenizer, task).prepared
    start = time.perf_counter()
    for ratio in RATIOS:
        for name, press in kvpress_presses(ratio).items():
            runner = eager_model if name == "h2o" else model
            for example, prompt in examples:
                answer_under(
                    runner, tokenizer, press(runner), prompt, PROTOCOL, example.max_new_tokens
                )
    return time.perf_counter() - start


def warm_up(model, eager_model, tokenizer, task) -> None:
    """One untimed prefill per model, so that no mode pays the process's first-call costs."""
    _, prompt = prepared_examples(model, tokenizer, task).prepared[0]
    for runner in (model, eager_model):
        with torch.inference_mode():
            prefill(runner, prefill_ids(prompt, PROTOCOL), DynamicCache())


def same_predictions(first: Path, second: Path) -> bool:
    return all(
        [r["prediction"] for r in finished_rows(p)]
        == [r["prediction"] for r in finished_rows(second / p.name)]
        for p in first.iterdir()
    )


def compare_decoding(tokens: int, depths: list[float]) -> None:
    """Sweep mode with one-by-one and with batched decoding of its 20 cells."""
    model, tokenizer = load_model("smollm2-135m", dtype="float32", attn_implementation="sdpa")
    task = NeedleTask(context_lengths=[tokens], depths=depths)
    _, prompt = prepared_examples(model, tokenizer, task).prepared[0]
    with torch.inference_mode():
        prefill(model, prefill_ids(prompt, PROTOCOL), DynamicCache())  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        alone = time_sweep(model, tokenizer, task, Path(tmp, "alone"))
        batched = time_sweep(model, tokenizer, task, Path(tmp, "batched"), decode_batch=True)
        same = same_predictions(Path(tmp, "alone"), Path(tmp, "batched"))
    print(f"\nSmolLM2-135M-Instruct, needle at {tokens} tokens, {len(depths)} example(s), 20 cells")
    print("| sweep mode | wall time (s) |\n|---|---:|")
    print(
        f"| cells decoded one by one | {alone:.1f} |\n| cells decoded as batches | {batched:.1f} |"
    )
    print(f"\nbatched predictions identical to one by one: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="needle context length")
    parser.add_argument("--depths", type=float, nargs="+", default=[50.0])
    parser.add_argument(
        "--decode-batch", action="store_true", help="time one-by-one against batched decoding"
    )
    args = parser.parse_args()
    if args.decode_batch:
        compare_decoding(args.tokens, args.depths)
        return
    model, tokenizer = load_model("smollm2-135m", dtype="float32", attn_implementation="sdpa")
    eager_model, _ = load_model("smollm2-135m", dtype="float32", attn_implementation="eager")
    task = NeedleTask(context_lengths=[args.tokens], depths=args.depths)
    warm_up(model, eager_model, tokenizer, task)
    with tempfile.TemporaryDirectory() as tmp:
        sweep_seconds = time_sweep(model, tokenizer, task, Path(tmp, "sweep"))
        separate_seconds = time_separate(model, tokenizer, task, Path(tmp, "separate"))
        same = same_predictions(Path(tmp, "sweep"), Path(tmp, "separate"))
    kvpress_seconds = time_kvpress(model, eager_model, tokenizer, task)
    n_examples = len(args.depths)
    print(
        f"\nSmolLM2-135M-Instruct, needle at {args.tokens} tokens, {n_examples} example(s), "
        f"5 methods x {len(RATIOS)} ratios = 20 cells, {PROTOCOL}, CPU ({torch.get_num_threads()} threads)"
    )
    print("| mode | wall time (s) | x sweep mode |")
    print("|---|---:|---:|")
    for mode, seconds in [
        ("sweep mode (one prefill per example)", sweep_seconds),
        ("separate runs (one prefill per cell)", separate_seconds),
        ("kvpress presses (one prefill per cell)", kvpress_seconds),
    ]:
        print(f"| {mode} | {seconds:.1f} | {seconds / sweep_seconds:.1f} |")
    print(f"\nsweep predictions identical to separate runs: {same}")


if __name__ == "__main__":
    main()
