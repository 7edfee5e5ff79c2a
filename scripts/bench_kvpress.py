"""Wall time of kvpress presses in sweep mode against kvpress's own per-press evaluation.

On SmolLM2-135M-Instruct (CPU) and the needle task, the same cells (a subset of the supported
kvpress presses x ratios, with their kvpress defaults) are run two ways in this process:

- sweep mode (``methods=[kvpress-tova,...] ratios=[...]``): one prefill per example scores every
  press through its own ``score``; each cell decodes from its own gathered cache;
- kvpress: the press's own hooks (``with press(model):``) around one prefill per cell and
  example, as kvpress's pipeline and evaluation run it, followed by the same greedy decoding.

One untimed prefill comes first, so that neither mode pays the process's first-call costs. The
script prints both times, their ratio, and in how many cells x examples the two produced the
same answer (the kept sets are equal, tests/interop/test_kvpress_scorers.py; kvpress leaves its cache
in score order, ours in prompt order, so sums run in another order and a near-tie may differ).
Needs kvpress (pip install -e '.[kvpress]'):

    python scripts/bench_kvpress.py [--tokens 4096] [--depths 50] [--presses TOVAPress ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from capkv import Budget
from capkv.harness.runner import Cell, answer_under, prefill, prefill_ids, prepared_examples
from capkv.harness.sweep import run_sweep
from capkv.interop import KvpressMethod
from capkv.interop.environment import import_kvpress
from capkv.models import load_model
from capkv.results.store import finished_rows
from capkv.tasks.needle import NeedleTask

PRESSES = ("TOVAPress", "KnormPress", "ExpectedAttentionPress", "SnapKVPress", "StreamingLLMPress")
RATIOS = (0.5, 0.75)
PROTOCOL = "query_aware"


def time_sweep(model, tokenizer, task, presses, folder: Path) -> tuple[float, dict]:
    """Seconds of the sweep, and each cell's predictions by (press, ratio)."""
    cells = {}
    for press in presses:
        method = KvpressMethod(press=press)
        for ratio in RATIOS:
            identity = {
                "model": "smollm2-135m",
                "task": "needle",
                "method": method.folder_name,
                "budget": Budget(ratio=ratio).label,
                "protocol": PROTOCOL,
            }
            run_dir = folder / f"{press}-{ratio}"
            cells[press, ratio] = Cell(method, Budget(ratio=ratio), run_dir, identity)
    start = time.perf_counter()
    run_sweep(model, tokenizer, task, list(cells.values()), PROTOCOL)
    seconds = time.perf_counter() - start
    predictions = {
        key: [row["prediction"] for row in finished_rows(cell.run_dir)]
        for key, cell in cells.items()
    }
    return seconds, predictions


def time_kvpress(model, tokenizer, task, presses) -> tuple[float, dict]:
    """Seconds of kvpress's per-press runs, and each cell's predictions by (press, ratio)."""
    kvpress = import_kvpress("scripts/bench_kvpress.py")
    examples = prepared_examples(model, tokenizer, task).prepared
    predictions = {}
    start = time.perf_counter()
    for press_name in presses:
        for ratio in RATIOS:
            press = getattr(kvpress, press_name)(compression_ratio=ratio)
            answers = []
            for example, prompt in examples:
                answers.append(
                    answer_under(
                        model, tokenizer, press(model), prompt, PROTOCOL, example.max_new_tokens
                    )
                )
            predictions[press_name, ratio] = answers
    return time.perf_counter() - start, predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="needle context length")
    parser.add_argument("--depths", type=float, nargs="+", default=[50.0])
    parser.add_argument("--presses", nargs="+", default=list(PRESSES))
    args = parser.parse_args()
    import_kvpress("scripts/bench_kvpress.py")
    model, tokenizer = load_model("smollm2-135m", dtype="float32", attn_implementation="sdpa")
    task = NeedleTask(context_lengths=[args.tokens], depths=args.depths)
    _, prompt = prepared_examples(model, tokenizer, task).prepared[0]
    with torch.inference_mode():  # untimed: first-call costs
        prefill(model, prefill_ids(prompt, PROTOCOL), DynamicCache())
    with tempfile.TemporaryDirectory() as tmp:
        sweep_seconds, ours = time_sweep(model, tokenizer, task, args.presses, Path(tmp))
    kvpress_seconds, theirs = time_kvpress(model, tokenizer, task, args.presses)
    same = sum(a == b for key in ours for a, b in zip(ours[key], theirs[key], strict=True))
    total = sum(len(answers) for answers in ours.values())
    print(
        f"\nSmolLM2-135M-Instruct, needle at {args.tokens} tokens, {len(args.depths)} example(s), "
        f"{len(args.presses)} presses x {len(RATIOS)} ratios = {len(ours)} cells, {PROTOCOL}, "
        f"CPU ({torch.get_num_threads()} threads)"
    )
    print("| mode | wall time (s) | x sweep mode |")
    print("|---|---:|---:|")
    for mode, seconds in [
        ("sweep mode (one prefill per example)", sweep_seconds),
        ("kvpress's own hooks (one prefill per cell and example)", kvpress_seconds),
    ]:
        print(f"| {mode} | {seconds:.1f} | {seconds / sweep_seconds:.1f} |")
    print(f"\nsame answer in {same} of {total} cells x examples")


if __name__ == "__main__":
    main()
