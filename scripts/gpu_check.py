"""Every GPU measurement of the engine in one run: agreement with the CPU, bfloat16, the fused
H2O kernel, prefill cost and batched decoding on an 8B-shaped model, with a summary of targets.

Not a test (CI has no GPU): a script to run where a GPU is, writing ``results/gpu/`` and printing
Markdown tables. On one H200 the whole run takes under 5 minutes:

    python scripts/gpu_check.py            # 8k and 32k tokens, 20 cells x 128 new tokens

1. Agreement: on the tiny random model, the kept indices of every method computed on the GPU
   (float32; H2O through the fused Triton kernel, ``h2o-chunked`` through the PyTorch path)
   against the same prefill on the CPU, per layer and KV head.
2. bfloat16 on the GPU: a budget at least the prompt length leaves greedy generation identical
   to no eviction, and every method compresses and generates.
3. The fused H2O kernel against the chunked path on the 8B-shaped model (bfloat16, first token
   count): H2O's kept sets of both in one prefill, per layer and KV head.
4. Prefill cost on a Llama-3.1-8B-sized model with random bfloat16 weights (32 layers, 32 query
   and 8 KV heads, hidden 4096): each method's prefill time relative to the plain prefill (sdpa
   with torch's flash kernel forced, so no method can rely on attention weights) and its peak
   GPU memory minus the plain prefill's, beside one layer's T x T attention matrix.
5. Decoding the 20 cells of a sweep (5 methods x 4 ratios) of one prompt, ``--new-tokens`` each
   with no stop token: one by one against one padded batch (``capkv.engine.decoding``).
6. A summary of the issue's targets (H2O and CapKV prefill ratios, batched decoding speed-up).

``--small`` is the dry run: a 4-layer model with the 8B model's heads, short prompts, few cells
and tokens; it runs on the CPU (the H2O kernel then through Triton's interpreter, if Triton is
installed) in a few minutes, so the script is known to work before GPU time is spent.
"""

from __future__ import annotations

import os
import sys

import torch

if "--small" in sys.argv and not torch.cuda.is_available():
    # Triton reads this when first imported (transformers imports it through torch later).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402  (after the interpreter switch)
import contextlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig  # noqa: E402

import baselines  # noqa: E402
import capkv  # noqa: E402
from capkv.engine.attention import accumulated_attention  # noqa: E402
from capkv.engine.budget import Budget  # noqa: E402
from capkv.engine.compression import gathered_cache, record_kept  # noqa: E402
from capkv.engine.decoding import batched_greedy_generate, greedy_generate  # noqa: E402
from capkv.engine.hooks import run_with_cache  # noqa: E402
from capkv.harness.sweep import decoding_groups  # noqa: E402
from capkv.models import build_tiny_model  # noqa: E402


class ChunkedH2O(baselines.H2O):
    """H2O through the chunked PyTorch path even on CUDA (the fused kernel's baseline)."""

    def score(self, layer):
        return accumulated_attention(layer, self.chunk, fused=False)


class FusedH2O(baselines.H2O):
    """H2O through the fused Triton kernel (on the CPU: Triton's interpreter)."""

    def score(self, layer):
        return accumulated_attention(layer, self.chunk, fused=True)


METHODS = {
    "full": baselines.Full(),
    "capkv": capkv.CapKV(),
    "snapkv": baselines.SnapKV(),
    "pyramidkv": baselines.PyramidKV(),
    "h2o": baselines.H2O(),
    "h2o-chunked": ChunkedH2O(),
    "streamingllm": baselines.StreamingLLM(),
}
SWEEP_METHODS = ["capkv", "snapkv", "pyramidkv", "h2o", "streamingllm"]
SWEEP_RATIOS = [0.25, 0.5, 0.75, 0.9]
LLAMA_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
}
SMALL = {**LLAMA_8B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kept_sets(model, method, input_ids: torch.Tensor, budget: int) -> dict[int, torch.Tensor]:
    with torch.inference_mode(), capkv.evict(model, method, budget=budget) as record:
        run_with_cache(model.model, input_ids.to(model.device), DynamicCache())
    return {layer: kept[0].cpu() for layer, kept in record.kept.items()}


def agreement(budget: int = 64, prompt: int = 300) -> list[dict]:
    """Part 1: GPU float32 against CPU float32 on the tiny model."""
    model, _ = build_tiny_model(seed=0)
    input_ids = torch.randint(
        3, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0)
    )
    cpu = {name: kept_sets(model, m, input_ids, budget) for name, m in METHODS.items() if m.evicts}
    model = model.to("cuda")
    rows = []
    for name, on_cpu in cpu.items():
        on_gpu = kept_sets(model, METHODS[name], input_ids, budget)
        same, overlap, total = 0, 0.0, 0
        for layer, cpu_kept in on_cpu.items():
            for head in range(cpu_kept.shape[0]):
                a, b = set(cpu_kept[head].tolist()), set(on_gpu[layer][head].tolist())
                same += a == b
                overlap += len(a & b) / len(a | b)
                total += 1
        rows.append(
            {
                "method": name,
                "identical (layer, head) sets": f"{same}/{total}",
                "mean Jaccard": round(overlap / total, 4),
            }
        )
    return rows


def bf16_generation(prompt: int = 300, new_tokens: int = 20) -> list[dict]:
    """Part 2: bfloat16 on the GPU; budget >= prompt equals no eviction."""
    model, _ = build_tiny_model(seed=0)
    model = model.to("cuda", torch.bfloat16)
    input_ids = torch.randint(
        3, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1)
    ).cuda()

    def generate(method=None, budget=None) -> list[int]:
        cache = DynamicCache()
        with torch.inference_mode():
            context = (
                capkv.evict(model, method, budget=budget) if method else contextlib.nullcontext()
            )
            with context:
                logits = run_with_cache(model, input_ids, cache, logits_to_keep=1).logits[0, -1]
            return greedy_generate(model, cache, prompt, new_tokens, next_token_logits=logits)

    reference = generate()
    rows = []
    for name, method in METHODS.items():
        if not method.evicts:
            continue
        untouched = generate(method, budget=prompt) == reference
        compressed = generate(method, budget=64)
        rows.append(
            {
                "method": name,
                "budget >= prompt: same tokens as no eviction": untouched,
                "budget 64: tokens generated": len(compressed),
            }
        )
    return rows


def build_large(small: bool, device: torch.device):
    config = LlamaConfig(**(SMALL if small else LLAMA_8B))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def flash_only(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def random_ids(model, tokens: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, model.config.vocab_size, (1, tokens), generator=generator)
    return ids.to(model.device)


def kernel_agreement(model, tokens: int, budget: int) -> list[dict]:
    """Part 3: H2O's kept sets through the fused kernel and the chunked path, one prefill."""
    selections = [(FusedH2O(), Budget(tokens=budget)), (ChunkedH2O(), Budget(tokens=budget))]
    with torch.inference_mode(), flash_only(model.device):
        with record_kept(model, selections) as (fused, chunked):
            run_with_cache(model.model, random_ids(model, tokens), DynamicCache())
    same, overlap, total = 0, 0.0, 0
    for layer, kept in fused.kept.items():
        for head in range(kept.shape[1]):
            a, b = set(kept[0, head].tolist()), set(chunked.kept[layer][0, head].tolist())
            same += a == b
            overlap += len(a & b) / len(a | b)
            total += 1
    fused_path = "Triton kernel" if model.device.type == "cuda" else "Triton interpreter"
    return [
        {
            "tokens": tokens,
            "budget": budget,
            "fused path": fused_path,
            "identical (layer, head) sets": f"{same}/{total}",
            "mean Jaccard": round(overlap / total, 4),
        }
    ]


def prefill_cost(model, tokens: int, budget: int, repeats: int) -> list[dict]:
    """Part 4: prefill time and peak memory of each method beside the plain prefill."""
    device = model.device
    input_ids = random_ids(model, tokens)

    def prefill(method=None) -> tuple[float, int]:
        cache = DynamicCache()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode(), flash_only(device):
            if method is None:
                run_with_cache(model.model, input_ids, cache)
            else:
                with capkv.evict(model, method, budget=budget if method.evicts else None):
                    run_with_cache(model.model, input_ids, cache)
        synchronize(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        return seconds, peak

    prefill()  # warm-up
    config = model.config
    txt_gib = config.num_attention_heads * tokens * tokens * 2 / 2**30
    rows = []
    for name, method in METHODS.items():
        prefill(method)  # warm-up (kernel compilation, autotuning)
        timed, plain = [], []
        for _ in range(repeats):
            seconds, plain_peak = prefill()
            plain.append(seconds)
            seconds, peak = prefill(method)
            timed.append(seconds)
        rows.append(
            {
                "method": name,
                "tokens": tokens,
                "prefill (s)": round(statistics.median(timed), 3),
                "plain prefill (s)": round(statistics.median(plain), 3),
                "x plain": round(statistics.median(timed) / statistics.median(plain), 3),
                "peak minus plain peak (GiB)": round((peak - plain_peak) / 2**30, 3),
                "one layer's T x T bf16 (GiB)": round(txt_gib, 2),
            }
        )
        print(markdown([rows[-1]]).splitlines()[-1], flush=True)
    return rows


def batched_decoding(model, tokens: int, new_tokens: int, methods, ratios) -> list[dict]:
    """Part 5: the cells of one prompt decoded one by one against one padded batch."""
    device = model.device
    input_ids = random_ids(model, tokens, seed=1)
    selections = [(METHODS[name], Budget(ratio=ratio)) for name in methods for ratio in ratios]
    full_cache = DynamicCache()
    with torch.inference_mode(), flash_only(device), record_kept(model, selections) as records:
        logits = run_with_cache(model, input_ids, full_cache, logits_to_keep=1).logits[0, -1]

    def timed(decode) -> tuple[float, list[list[int]]]:
        synchronize(device)
        start = time.perf_counter()
        generated = decode()
        synchronize(device)
        return time.perf_counter() - start, generated

    def one_by_one() -> list[list[int]]:
        return [
            greedy_generate(
                model, gathered_cache(full_cache, r), tokens, new_tokens, next_token_logits=logits
            )
            for r in records
        ]

    def together() -> list[list[int]]:
        """As sweep mode does it: groups that bound the padding, one batch each."""
        generated: list[list[int]] = [[] for _ in records]
        for group in decoding_groups(records):
            caches = [gathered_cache(full_cache, records[i]) for i in group]
            batch = batched_greedy_generate(
                model, caches, tokens, new_tokens, next_token_logits=logits
            )
            del caches
            for index, tokens_of_cell in zip(group, batch, strict=True):
                generated[index] = tokens_of_cell
        return generated

    greedy_generate(model, DynamicCache(), 0, 2, input_ids=input_ids[:, :8])  # warm-up
    alone_seconds, alone = timed(one_by_one)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batch_seconds, batch = timed(together)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    identical = sum(a == b for a, b in zip(alone, batch, strict=True))
    return [
        {
            "tokens": tokens,
            "cells": len(records),
            "batches": len(decoding_groups(records)),
            "new tokens per cell": new_tokens,
            "one by one (s)": round(alone_seconds, 2),
            "batched (s)": round(batch_seconds, 2),
            "speed-up": round(alone_seconds / batch_seconds, 2),
            "batched peak memory (GiB)": round(peak, 1),
            "cells with identical tokens": f"{identical}/{len(records)}",
        }
    ]


def summary(report: dict) -> list[dict]:
    """Part 6: the issue's targets against what was measured."""
    rows = []
    cost = report.get("cost") if isinstance(report.get("cost"), list) else []
    for name, target in [("h2o", 1.3), ("capkv", 1.05)]:
        for row in cost:
            if row["method"] == name:
                rows.append(
                    {
                        "target": f"{name} prefill at {row['tokens']} tokens <= {target}x plain",
                        "measured": f"{row['x plain']}x",
                        "met": row["x plain"] <= target,
                    }
                )
    decoding = report.get("decoding") if isinstance(report.get("decoding"), list) else []
    for row in decoding:
        rows.append(
            {
                "target": f"batched decoding of {row['cells']} cells at {row['tokens']} tokens >= 5x",
                "measured": f"{row['speed-up']}x",
                "met": row["speed-up"] >= 5,
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[key]) for key in header) + " |" for row in rows]
    return "\n".join(lines)


def kernel_available(device: torch.device) -> bool:
    try:
        import capkv.engine.h2o_kernel  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+")
    parser.add_argument("--budget", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--small", action="store_true", help="dry run (works on the CPU)")
    parser.add_argument("--out", type=Path, default=Path("results/gpu"))
    args = parser.parse_args()
    small = args.small
    tokens = args.tokens or ([256, 512] if small else [8192, 32768])
    budget = args.budget or (64 if small else 512)
    repeats = args.repeats or (1 if small else 2)
    new_tokens = args.new_tokens or (4 if small else 128)
    methods = SWEEP_METHODS[:2] if small else SWEEP_METHODS
    ratios = SWEEP_RATIOS[:2] if small else SWEEP_RATIOS
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import transformers

    header = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"
        + (" (--small dry run)" if small else "")
    )
    print(header, flush=True)
    report: dict = {"environment": header}
    started = time.perf_counter()
    large = {}

    def model():
        if "model" not in large:
            large["model"] = build_large(small, device)
        return large["model"]

    parts = []
    if device.type == "cuda":
        parts += [("agreement", agreement), ("bf16_generation", bf16_generation)]
    if kernel_available(device):
        parts.append(("kernel", lambda: kernel_agreement(model(), tokens[0], budget)))
    else:
        report["kernel"] = "not run: Triton is not installed (or no GPU and no interpreter)"
    parts.append(
        ("cost", lambda: [r for n in tokens for r in prefill_cost(model(), n, budget, repeats)])
    )
    parts.append(
        (
            "decoding",
            lambda: [
                r for n in tokens for r in batched_decoding(model(), n, new_tokens, methods, ratios)
            ],
        )
    )
    parts.append(("summary", lambda: summary(report)))
    for name, part in parts:
        print(f"\n## {name}", flush=True)
        try:
            report[name] = part()
            print(markdown(report[name]), flush=True)
        except Exception:  # report and go on: one failing part must not hide the others
            report[name] = traceback.format_exc()
            print(report[name], flush=True)
        report["seconds"] = round(time.perf_counter() - started, 1)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        (args.out / "gpu_check.md").write_text(
            "\n\n".join(
                f"## {key}\n\n{markdown(value) if isinstance(value, list) else value}"
                for key, value in report.items()
            )
        )
    print(f"\nall parts in {report['seconds']} s; written to {args.out}", flush=True)


if __name__ == "__main__":
    main()
