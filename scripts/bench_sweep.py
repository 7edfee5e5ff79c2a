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

With ``--ruler`` it runs the cells of ``python run.py experiment=ruler`` (19 cells, diagnostics
on) on one RULER prompt per subtask at ``--tokens`` tokens, twice per prompt, interleaved: with
today's decoding (each cell one after the other, appending by concatenation: the code before
issue 29, restored here by patching) and with the current one (``RoomyLayer`` room and lockstep
decoding). It prints both times per prompt and their ratio, and checks that every row (the
``seconds`` field aside) is identical. With ``--profile`` it profiles one sweep of today's path
per prompt instead (cProfile) and prints where its time goes.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_sweep.py --ruler [--profile] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
from transformers import DynamicCache

from baselines import H2O, PyramidKV, SnapKV, StreamingLLM
from capkv import Budget, CapKV
from capkv.engine import decoding
from capkv.harness import runner as harness_runner
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


RULER_SUBTASKS = (
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
)


def ruler_plan(subtask: str, tokens: int, results_dir: Path):
    """The plan ``python run.py experiment=ruler`` makes, for the first prompt of one subtask."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from capkv.harness.plan import CONF_DIR, plan_run

    overrides = [
        "experiment=ruler",
        f"task.context_lengths=[{tokens}]",
        "task.num_examples=1",
        f"task.subtasks=[{subtask}]",
        f"results_dir={results_dir}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        HydraConfig.instance().set_config(
            compose("config", overrides=overrides, return_hydra_config=True)
        )
        return plan_run(compose("config", overrides=overrides))


def one_by_one(model, caches, start, max_new_tokens, stops, **fed) -> list[list[int]]:
    return [decoding.greedy_generate(model, c, start, max_new_tokens, stops, **fed) for c in caches]


@contextmanager
def todays_decoding():
    """Decoding as before issue 29: cells one after the other, every token concatenated."""
    with (
        mock.patch.object(decoding, "reserve_room", lambda cache, tokens: None),
        mock.patch.object(harness_runner, "lockstep_greedy_generate", one_by_one),
    ):
        yield


def timed_sweep(model, tokenizer, plan) -> float:
    start = time.perf_counter()
    run_sweep(model, tokenizer, plan.task, plan.cells, plan.protocol, diagnostics=plan.diagnostics)
    return time.perf_counter() - start


def same_rows(first: Path, second: Path) -> bool:
    """Whether two results folders hold the same rows, ``seconds`` aside."""
    paths = sorted(p.relative_to(first) for p in first.rglob("examples*.jsonl"))
    rows = [
        [{k: v for k, v in r.items() if k != "seconds"} for r in finished_rows((root / p).parent)]
        for root in (first, second)
        for p in paths
    ]
    return bool(paths) and rows[: len(paths)] == rows[len(paths) :]


PHASES = {  # (file suffix, function): phase, the cumulative times of today's sweep
    ("harness/runner.py", "prefill"): "prefill (forward, scoring, capacity probe)",
    ("baselines/h2o.py", "score"): "  of which H2O scoring",
    ("baselines/snapkv.py", "score"): "  of which SnapKV/PyramidKV scoring",
    ("capkv/cap.py", "score"): "  of which CapKV scoring",
    ("capkv/engine/method.py", "kept_indices"): "  of which top-k per budget",
    ("analysis/diagnostics.py", "on_layer"): "  of which capacity probe (diagnostics)",
    ("harness/sweep.py", "measure"): "attention error (diagnostics)",
    ("engine/compression.py", "gathered_cache"): "gathering each cell's cache",
    ("engine/decoding.py", "greedy_generate"): "decoding (19 cells)",
    ("~", "<built-in method torch.cat>"): "torch.cat anywhere (mostly cache appends)",
    ("harness/runner.py", "result_row"): "metrics (scores, row)",
    ("harness/runner.py", "append"): "writing rows",
    ("harness/runner.py", "close"): "writing metrics.json",
}


def phase_seconds(profile: pstats.Stats) -> dict[str, float]:
    """Cumulative seconds of each phase of :data:`PHASES` in ``profile``."""
    seconds = dict.fromkeys(PHASES.values(), 0.0)
    for (path, _, function), (_, _, _, cumulative, _) in profile.stats.items():
        for (suffix, name), phase in PHASES.items():
            if path.endswith(suffix) and function == name:
                seconds[phase] += cumulative
    return seconds


def profile_ruler(model, tokenizer, tokens: int, subtasks: list[str], folder: Path) -> None:
    """Where today's sweep spends its time on one prompt per subtask (cProfile)."""
    total = 0.0
    phases: dict[str, float] = {}
    for subtask in subtasks:
        plan = ruler_plan(subtask, tokens, folder / subtask)
        profiler = cProfile.Profile()
        with todays_decoding():
            profiler.enable()
            seconds = timed_sweep(model, tokenizer, plan)
            profiler.disable()
        total += seconds
        for phase, value in phase_seconds(pstats.Stats(profiler)).items():
            phases[phase] = phases.get(phase, 0.0) + value
        print(f"{subtask}: {seconds:.1f} s")
    print("\n| phase | seconds | share |\n|---|---:|---:|")
    for phase, value in phases.items():
        print(f"| {phase} | {value:.1f} | {value / total:.1%} |")
    print(f"| whole sweep | {total:.1f} | 100% |")


def compare_ruler(tokens: int, subtasks: list[str], profile: bool) -> None:
    """Today's against the current sweep of the 19 RULER cells, one prompt per subtask."""
    model, tokenizer = load_model("smollm2-135m", dtype="float32", attn_implementation="sdpa")
    with tempfile.TemporaryDirectory() as tmp:
        plan = ruler_plan(subtasks[0], tokens, Path(tmp, "warm-up"))
        _, prompt = prepared_examples(model, tokenizer, plan.task).prepared[0]
        with torch.inference_mode():
            prefill(model, prefill_ids(prompt, PROTOCOL), DynamicCache())  # warm-up
        if profile:
            profile_ruler(model, tokenizer, tokens, subtasks, Path(tmp))
            return
        print(f"\nSmolLM2-135M-Instruct, RULER at {tokens} tokens, 19 cells, diagnostics on")
        print("| subtask | today (s) | now (s) | ratio |\n|---|---:|---:|---:|")
        totals = [0.0, 0.0]
        for subtask in subtasks:
            with todays_decoding():
                old = timed_sweep(
                    model, tokenizer, ruler_plan(subtask, tokens, Path(tmp, "old", subtask))
                )
            new = timed_sweep(
                model, tokenizer, ruler_plan(subtask, tokens, Path(tmp, "new", subtask))
            )
            totals = [totals[0] + old, totals[1] + new]
            print(f"| {subtask} | {old:.1f} | {new:.1f} | {old / new:.2f} |")
        print(f"| all | {totals[0]:.1f} | {totals[1]:.1f} | {totals[0] / totals[1]:.2f} |")
        print(f"\nrows identical (seconds aside): {same_rows(Path(tmp, 'old'), Path(tmp, 'new'))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="needle context length")
    parser.add_argument("--depths", type=float, nargs="+", default=[50.0])
    parser.add_argument(
        "--decode-batch", action="store_true", help="time one-by-one against batched decoding"
    )
    parser.add_argument("--ruler", action="store_true", help="today's against the current sweep")
    parser.add_argument("--profile", action="store_true", help="with --ruler: profile today's")
    parser.add_argument("--subtasks", nargs="+", default=list(RULER_SUBTASKS))
    args = parser.parse_args()
    if args.ruler:
        compare_ruler(args.tokens, args.subtasks, args.profile)
        return
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
