"""Prefill cost of every method relative to the same prefill without eviction.

For the tiny random model and SmolLM2-135M-Instruct at 4k tokens, prints one table per model:
the median prefill time with each method, its ratio to the plain (no-hook) sdpa prefill, and
the peak resident memory the prefill adds on top of the loaded model (the plain prefill's
own activations and cache included), beside the size of one
layer's T x T attention matrix (which no method allocates). Each method runs in its own
process so that peak memory is its own.

    .venv/bin/python scripts/bench_prefill.py [--tokens 4096] [--repeats 5] [--models tiny smollm2]

Targets (issue 2): CapKV at most 1.05x, H2O at most 1.5x the plain sdpa prefill.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from transformers import DynamicCache

METHODS = {
    "none": None,
    "full": "baselines.Full()",
    "capkv": "capkv.CapKV()",
    "snapkv": "baselines.SnapKV()",
    "pyramidkv": "baselines.PyramidKV()",
    "h2o": "baselines.H2O()",
    "streamingllm": "baselines.StreamingLLM()",
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(model_name: str, method_name: str, tokens: int, repeats: int, budget: int) -> dict:
    """Time ``repeats`` prefills of ``tokens`` tokens with one method (run in a fresh process)."""
    import baselines  # noqa: F401  (used by eval of METHODS)
    import capkv
    from capkv.models import load_model

    torch.set_num_threads(torch.get_num_threads())
    model, _ = load_model(model_name, dtype="float32", attn_implementation="sdpa")
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(100, model.config.vocab_size, (1, tokens), generator=generator)
    method = eval(METHODS[method_name]) if METHODS[method_name] else None

    def prefill() -> float:
        cache = DynamicCache()
        start = time.perf_counter()
        with torch.inference_mode():
            if method is None:
                model.model(input_ids, past_key_values=cache)
            else:
                with capkv.evict(model, method, budget=budget if method.evicts else None):
                    model.model(input_ids, past_key_values=cache)
        return time.perf_counter() - start

    loaded_rss = peak_rss_mb()
    prefill()  # warm-up
    times = [prefill() for _ in range(repeats)]
    config = model.config
    matrix_mb = config.num_attention_heads * tokens * tokens * 4 / 2**20
    return {
        "seconds": statistics.median(times),
        "extra_peak_mb": peak_rss_mb() - loaded_rss,
        "txt_mb": matrix_mb,
    }


def run_model(model_name: str, tokens: int, repeats: int, budget: int) -> list[dict]:
    rows = []
    for method_name in METHODS:
        command = [
            sys.executable,
            __file__,
            "--worker",
            model_name,
            method_name,
            "--tokens",
            str(tokens),
            "--repeats",
            str(repeats),
            "--budget",
            str(budget),
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append({"method": method_name, **json.loads(output.strip().splitlines()[-1])})
    return rows


def print_table(model_name: str, tokens: int, rows: list[dict]) -> None:
    base = next(row["seconds"] for row in rows if row["method"] == "none")
    print(f"\n{model_name}, {tokens} tokens, batch 1, float32, sdpa, CPU")
    print(
        "| method | prefill (s) | x plain prefill | extra peak RSS (MB) | one T x T matrix (MB) |"
    )
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['method']} | {row['seconds']:.3f} | {row['seconds'] / base:.2f} | "
            f"{row['extra_peak_mb']:.0f} | {row['txt_mb']:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--models", nargs="+", default=["tiny-random", "smollm2-135m"])
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.tokens, args.repeats, args.budget)))
        return
    for model_name in args.models:
        print_table(
            model_name, args.tokens, run_model(model_name, args.tokens, args.repeats, args.budget)
        )


if __name__ == "__main__":
    main()
