"""Prefill cost of every method relative to the same prefill without eviction.

For the tiny random model and SmolLM2-135M-Instruct at 4k tokens, prints one table per model:
the median prefill time with each method beside the plain (no-hook) sdpa prefill timed
alternately in the same process, their ratio, and the peak resident memory the method adds
beyond the plain prefill's own peak, beside the size of one
layer's T x T attention matrix (which no method allocates). Each method runs in its own
process so that peak memory is its own.

    .venv/bin/python scripts/bench_prefill.py [--tokens 4096] [--repeats 5]
        [--models tiny-random smollm2-135m] [--methods capkv h2o ...]

Targets (issue 2): CapKV at most 1.05x, H2O at most 1.5x the plain sdpa prefill. Issue 13: CapKV's
one-shot allocations (head-wise ``capkv_adaptive``, model-wide ``capkv_model``) within 5% of the
plain prefill, the iterative one (``capkv_iterative``, 4 rounds) within 25%:

    .venv/bin/python scripts/bench_prefill.py --models smollm2-135m \
        --methods capkv capkv_adaptive capkv_model capkv_iterative snapkv snapkv_adaptive
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
    "none": None,  # the plain prefill, timed beside every method
    "full": "baselines.Full()",
    "capkv": "capkv.CapKV()",
    "capkv_adaptive": "capkv.CapKV(allocation='adaptive')",
    "capkv_model": "capkv.CapKV(allocation='model')",
    "capkv_iterative": "capkv.CapKV(allocation='adaptive', rounds=4)",
    "snapkv_adaptive": "baselines.SnapKV(allocation='adaptive')",
    "snapkv": "baselines.SnapKV()",
    "pyramidkv": "baselines.PyramidKV()",
    "h2o": "baselines.H2O()",
    "streamingllm": "baselines.StreamingLLM()",
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(model_name: str, method_name: str, tokens: int, repeats: int, budget: int) -> dict:
    """Time one method against the plain prefill, alternating the two, in a fresh process.

    Pairing the two in one process cancels most of the machine's drift; the peak memory the
    method adds is the growth of the process's peak RSS beyond the plain prefills' peak.
    """
    import baselines  # noqa: F401  (used by eval of METHODS)
    import capkv
    from capkv.engine.hooks import run_with_cache
    from capkv.models import load_model

    model, _ = load_model(model_name, dtype="float32", attn_implementation="sdpa")
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(100, model.config.vocab_size, (1, tokens), generator=generator)
    method = eval(METHODS[method_name]) if METHODS[method_name] else None

    def prefill(with_method: bool) -> float:
        cache = DynamicCache()
        start = time.perf_counter()
        with torch.inference_mode():
            if not with_method or method is None:
                run_with_cache(model.model, input_ids, cache)
            else:
                with capkv.evict(model, method, budget=budget if method.evicts else None):
                    run_with_cache(model.model, input_ids, cache)
        return time.perf_counter() - start

    loaded_rss = peak_rss_mb()
    plain = [prefill(False) for _ in range(repeats + 1)][1:]  # the first one warms up
    plain_peak = peak_rss_mb()
    timed = []
    for _ in range(repeats):
        timed.append(prefill(True))
        plain.append(prefill(False))
    config = model.config
    return {
        "seconds": statistics.median(timed),
        "plain_seconds": statistics.median(plain),
        "plain_peak_mb": plain_peak - loaded_rss,
        "extra_peak_mb": peak_rss_mb() - plain_peak,
        "txt_mb": config.num_attention_heads * tokens * tokens * 4 / 2**20,
    }


def run_model(
    model_name: str, tokens: int, repeats: int, budget: int, methods: list[str]
) -> list[dict]:
    rows = []
    for method_name in methods:
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
    print(f"\n{model_name}, {tokens} tokens, batch 1, float32, sdpa, CPU")
    print(
        "| method | prefill (s) | plain prefill (s) | x plain prefill | plain prefill peak "
        "RSS (MB) | extra peak RSS (MB) | one layer's T x T attention (MB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['method']} | {row['seconds']:.3f} | {row['plain_seconds']:.3f} | "
            f"{row['seconds'] / row['plain_seconds']:.2f} | {row['plain_peak_mb']:.0f} | "
            f"{row['extra_peak_mb']:.0f} | {row['txt_mb']:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--models", nargs="+", default=["tiny-random", "smollm2-135m"])
    parser.add_argument(
        "--methods", nargs="+", default=[m for m in METHODS if m != "none"], choices=list(METHODS)
    )
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.tokens, args.repeats, args.budget)))
        return
    for model_name in args.models:
        print_table(
            model_name,
            args.tokens,
            run_model(model_name, args.tokens, args.repeats, args.budget, args.methods),
        )


if __name__ == "__main__":
    main()
