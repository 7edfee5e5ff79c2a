"""The engine on a CUDA GPU: agreement with the CPU, bfloat16, and cost on an 8B-sized model.

Not a test (CI has no GPU): a script to run where a GPU is, printing Markdown tables.

    python scripts/gpu_check.py [--tokens 8192 32768] [--budget 512] [--out DIR]

1. Agreement: on the tiny random model, the kept indices of every method computed on the GPU
   (float32) against the same prefill on the CPU, per layer and KV head.
2. bfloat16 on the GPU: a budget at least the prompt length leaves greedy generation identical
   to no eviction, and every method compresses and generates.
3. Cost on a Llama-3.1-8B-sized model with random bfloat16 weights (32 layers, 32 query and 8 KV
   heads, hidden 4096): the prefill time of each method relative to the plain prefill (sdpa
   with torch's flash kernel forced, so no method can rely on attention weights), the peak GPU
   memory of each method's prefill minus the plain prefill's (negative: the compressed caches
   take less than the full cache), beside one layer's T x T attention matrix, and the decoding
   time per token with the compressed cache against the full one.

``--small`` runs part 3 on a small config, and works without a GPU (a dry run of the script).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import traceback
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

import baselines
import capkv
from capkv.decoding import greedy_generate
from capkv.hooks import run_with_cache
from capkv.models import build_tiny_model

METHODS = {
    "full": baselines.Full(),
    "capkv": capkv.CapKV(),
    "snapkv": baselines.SnapKV(),
    "pyramidkv": baselines.PyramidKV(),
    "h2o": baselines.H2O(),
    "streamingllm": baselines.StreamingLLM(),
}
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


def prefill_cost(model, tokens: int, budget: int, repeats: int) -> list[dict]:
    """Part 3: prefill time and peak memory of each method beside the plain prefill."""
    device = model.device
    input_ids = torch.randint(
        100, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0)
    ).to(device)

    def prefill(method=None) -> tuple[float, int, DynamicCache]:
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
        return seconds, peak, cache

    def decode_ms(cache: DynamicCache, steps: int = 32) -> float:
        token = input_ids[:, -1:]
        with torch.inference_mode():
            greedy_generate(model, cache, tokens, 2, input_ids=token)  # warm-up
            synchronize(device)
            start = time.perf_counter()
            greedy_generate(model, cache, tokens + 2, steps, input_ids=token)
            synchronize(device)
        return (time.perf_counter() - start) / steps * 1000

    prefill()  # warm-up
    config = model.config
    txt_gib = config.num_attention_heads * tokens * tokens * 2 / 2**30
    rows = []
    for name, method in METHODS.items():
        timed, plain = [], []
        for _ in range(repeats):
            seconds, plain_peak, full_cache = prefill()
            plain.append(seconds)
            seconds, peak, cache = prefill(method)
            timed.append(seconds)
        full_ms = decode_ms(full_cache)
        del full_cache
        method_ms = decode_ms(cache)
        del cache
        rows.append(
            {
                "method": name,
                "tokens": tokens,
                "prefill (s)": round(statistics.median(timed), 3),
                "plain prefill (s)": round(statistics.median(plain), 3),
                "x plain": round(statistics.median(timed) / statistics.median(plain), 3),
                "peak minus plain peak (GiB)": round((peak - plain_peak) / 2**30, 3),
                "one layer's T x T bf16 (GiB)": round(txt_gib, 2),
                "decode ms/token": round(method_ms, 2),
                "full-cache decode ms/token": round(full_ms, 2),
            }
        )
        print(markdown([rows[-1]]).splitlines()[-1], flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[key]) for key in header) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("results/gpu"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import transformers

    header = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"
    )
    print(header, flush=True)
    report = {"environment": header}
    parts = []
    if device.type == "cuda":
        parts += [("agreement", agreement), ("bf16_generation", bf16_generation)]

    def cost() -> list[dict]:
        model = build_large(args.small, device)
        rows = []
        for tokens in args.tokens:
            rows += prefill_cost(model, tokens, args.budget, args.repeats)
        return rows

    parts.append(("cost", cost))
    for name, part in parts:
        print(f"\n## {name}", flush=True)
        try:
            report[name] = part()
            print(markdown(report[name]), flush=True)
        except Exception:  # report and go on: one failing part must not hide the others
            report[name] = traceback.format_exc()
            print(report[name], flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        (args.out / "gpu_check.md").write_text(
            "\n\n".join(
                f"## {key}\n\n{markdown(value) if isinstance(value, list) else value}"
                for key, value in report.items()
            )
        )


if __name__ == "__main__":
    main()
