"""Time per token and bytes held of the quantized cache storages, beside the plain cache.

On SmolLM2-135M-Instruct (CPU, float32, sdpa) and the first ``T`` tokens of the Paul Graham
essays (4096 by default), one process measures, for the full cache and for one method at budget
``N`` (CapKV at 1024 by default), every storage of ``--caches`` (by default none, bf16, fp8,
hqq8, hqq4, hqq2, quanto4, quanto2; a storage whose backend is not installed is skipped with a
printed line), as the harness runs a quantized cell (:func:`capkv.harness.runner.generate_one`):

1. the prefill with eviction (:func:`capkv.engine.compression.evict`), timed: how a cache is
   stored comes after the prefill and does not change it, so each method is prefilled once per
   round and every storage of that method starts from the same compressed cache;
2. the kept cache moved into the storage (:func:`capkv.engine.quantization.quantized_cache`,
   as :func:`capkv.harness.runner.stored` does), timed apart as "quantize"; the plain storage
   (``none``) decodes from an untimed copy of the kept cache, so that every storage reads the
   same one;
3. ``--new-tokens`` (160) greedy tokens decoded from that cache with the harness's decoder
   (:func:`capkv.engine.decoding.greedy_generate`, inside the eviction context as in
   ``generate_one``), with no stop token. The first token is the argmax of the prefill's logits,
   so every storage's first token is the plain one's and ``new - 1`` forwards decode; the time
   per token divides the decoding time by those forwards.

Tokens decoded after the quantization go to each quantized layer's full-precision residual;
once it would reach ``--residual-length`` tokens (128, the project's default), HQQ's and quanto's
layers re-quantize the whole layer (the kept prompt and the residual) and the fp8 layer appends
the residual as a new block. The default of 160 new tokens (159 forwards) makes every quantized
row pay one such re-quantization, at the 128th decoding step, inside its decoding time; the
16-bit casts have no residual and round every token as it comes.

Memory is the cache's own bytes, measured from its tensors
(:func:`capkv.engine.kv_bytes.held_bytes`: packed data, scales, zero points, the residual) right
after the quantization and again at the end of decoding, each compared with the plain cache of
the same method at the same moment. The process's peak RSS (``resource.getrusage``) is printed
after the warm-up and after each method's round, not per row: the prefill (sdpa's attention
buffers, the full cache before eviction) sets it, and what later rows allocate reuses memory the
allocator already holds, so one process cannot split it into storages.

"Same answer as none" is the share of the generated tokens equal, position by position, to the
plain storage's of the same method; "first difference" is the first position (1 = the first
generated token) where they differ.

One untimed short pass through every storage comes first, so that no row pays the process's
first-call costs (a backend's first quantization included); ``--repeats R`` runs R rounds over
all rows and takes medians. Times are the process's CPU time (``time.process_time``), which
other processes on a shared machine do not inflate as they do wall time (with one torch thread,
``OMP_NUM_THREADS=1``, it equals the wall time of a quiet machine); each row's wall time is shown
too. Ratios are against ``none`` of the same method.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_quantized.py   # docs/benchmarks.md
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_quantized.py --tokens 512 --new-tokens 8
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import Cache, DynamicCache, PreTrainedModel

from baselines import H2O, Full, PyramidKV, SnapKV, StreamingLLM
from capkv import Budget, CapKV
from capkv.engine.compression import evict
from capkv.engine.decoding import HEAD_MASK, greedy_generate
from capkv.engine.kv_bytes import held_bytes
from capkv.engine.method import EvictionMethod
from capkv.engine.quantization import CacheQuantization, named_storage, quantized_cache
from capkv.harness.runner import prefill
from capkv.models import load_model
from capkv.tasks.haystack import build_haystack

METHODS = {
    "capkv": CapKV,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "h2o": H2O,
    "streamingllm": StreamingLLM,
}
CACHES = ["none", "bf16", "fp8", "hqq8", "hqq4", "hqq2", "quanto4", "quanto2"]
REFERENCE = "none"
MIB = 2**20


@dataclass
class Clock:
    """CPU and wall seconds of one timed block."""

    cpu: float = 0.0
    wall: float = 0.0


@contextmanager
def timed() -> Iterator[Clock]:
    """Time the block: the process's CPU seconds and the wall seconds."""
    clock = Clock()
    start, start_cpu = time.perf_counter(), time.process_time()
    try:
        yield clock
    finally:
        clock.cpu = time.process_time() - start_cpu
        clock.wall = time.perf_counter() - start


@dataclass
class Row:
    """One storage of one method in one round."""

    prefill: Clock
    quantize: Clock
    decode: Clock
    held_bytes: int
    end_bytes: int
    tokens: list[int] = field(default_factory=list)


def plain_copy(cache: Cache) -> DynamicCache:
    """A new cache holding ``cache``'s layers as they are (their head masks too), so that
    decoding it leaves ``cache`` for the next storage."""
    copy = DynamicCache()
    for layer_idx, layer in enumerate(cache.layers):
        copy.update(layer.keys, layer.values, layer_idx)
        head_mask = getattr(layer, HEAD_MASK, None)
        if head_mask is not None:
            setattr(copy.layers[layer_idx], HEAD_MASK, head_mask)
    return copy


def measure(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    method: EvictionMethod,
    budget: int | None,
    storages: dict[str, CacheQuantization],
    new_tokens: int,
) -> dict[str, Row]:
    """One round of one method: a timed prefill, then each storage quantized and decoded.

    Returns
    -------
    dict
        Per storage name, its :class:`Row` (the prefill's clock is shared by all of them).
    """
    rows: dict[str, Row] = {}
    cache = DynamicCache()
    with evict(model, method, budget=None if budget is None else Budget(tokens=budget)):
        with timed() as prefill_clock:
            last_logits = prefill(model, input_ids, cache)
        for name, settings in storages.items():
            if settings.active:
                with timed() as quantize_clock:
                    stored = quantized_cache(cache, settings)
            else:
                quantize_clock, stored = Clock(), plain_copy(cache)
            held = held_bytes(stored)
            with timed() as decode_clock:
                tokens = greedy_generate(
                    model, stored, input_ids.shape[1], new_tokens, (), next_token_logits=last_logits
                )
            rows[name] = Row(
                prefill_clock, quantize_clock, decode_clock, held, held_bytes(stored), tokens
            )
            del stored
    return rows


def median_row(passes: list[Row]) -> Row:
    """The median of every time and byte count over the rounds (the tokens of the first)."""

    def clock(part: str) -> Clock:
        return Clock(
            statistics.median(getattr(row, part).cpu for row in passes),
            statistics.median(getattr(row, part).wall for row in passes),
        )

    return Row(
        clock("prefill"),
        clock("quantize"),
        clock("decode"),
        int(statistics.median(row.held_bytes for row in passes)),
        int(statistics.median(row.end_bytes for row in passes)),
        passes[0].tokens,
    )


def available_storages(names: list[str], residual_length: int) -> dict[str, CacheQuantization]:
    """The storages of ``names`` whose backend is installed; a line for each one skipped."""
    base = CacheQuantization(residual_length=residual_length)
    storages = {}
    for name in names:
        settings = named_storage(name, base)
        try:
            settings.check()
        except ValueError as error:
            print(f"skipped {name}: {error}")
            continue
        storages[name] = settings
    return storages


def agreement(tokens: list[int], reference: list[int]) -> tuple[float, str]:
    """The share of positions where ``tokens`` equal ``reference``, and the first position
    (from 1) where they differ ("-" where none does)."""
    same = [a == b for a, b in zip(tokens, reference, strict=True)]
    first = next((str(i + 1) for i, equal in enumerate(same) if not equal), "-")
    return sum(same) / len(same), first


def print_table(
    rows: dict[tuple[str, str], Row], tokens: int, args: argparse.Namespace, forwards: int
) -> None:
    print(
        f"\nSmolLM2-135M-Instruct, {tokens} essay tokens + {args.new_tokens} generated "
        f"({forwards} decoding forwards), {args.method} at budget {args.budget} and the full "
        f"cache; residual {args.residual_length} tokens, group size 64; batch 1, float32, sdpa, "
        f"CPU ({torch.get_num_threads()} thread(s)), median of {args.repeats} round(s); times "
        "are CPU time, ratios against none of the same method\n"
    )
    print(
        "| cache | storage | held after quantize (MiB) | x none | held at end (MiB) | x none "
        "| prefill (CPU ms/prompt token) | quantize (CPU ms) | prefill + quantize x none "
        "| decoding (CPU ms/token) | x none | same answer as none | first difference "
        "| wall time (s) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (cache, storage), row in rows.items():
        reference = rows[(cache, REFERENCE)]
        prefill_ms = 1000 * row.prefill.cpu / tokens
        prefill_ratio = (row.prefill.cpu + row.quantize.cpu) / (
            reference.prefill.cpu + reference.quantize.cpu
        )
        per_token = row.decode.cpu / forwards
        same, first = agreement(row.tokens, reference.tokens)
        wall = row.prefill.wall + row.quantize.wall + row.decode.wall
        print(
            f"| {cache} | {storage} | {row.held_bytes / MIB:.2f} | "
            f"{row.held_bytes / reference.held_bytes:.3f} | {row.end_bytes / MIB:.2f} | "
            f"{row.end_bytes / reference.end_bytes:.3f} | {prefill_ms:.2f} | "
            f"{1000 * row.quantize.cpu:.1f} | {prefill_ratio:.2f} | {1000 * per_token:.1f} | "
            f"{per_token / (reference.decode.cpu / forwards):.2f} | {same:.2f} | {first} | "
            f"{wall:.1f} |"
        )


def peak_rss_mib() -> float:
    """The process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="prompt length (essay tokens)")
    parser.add_argument("--new-tokens", type=int, default=160)
    parser.add_argument("--method", default="capkv", choices=list(METHODS))
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--caches", nargs="+", default=CACHES, metavar="STORAGE")
    parser.add_argument("--residual-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over every row (median)")
    args = parser.parse_args()
    args.caches = [REFERENCE] + [name for name in args.caches if name != REFERENCE]
    try:
        storages = available_storages(args.caches, args.residual_length)
        method = METHODS[args.method]()
        method.check_budget(Budget(tokens=args.budget))
    except ValueError as error:
        parser.error(str(error))
    model, tokenizer = load_model("smollm2-135m", dtype="float32", attn_implementation="sdpa")
    limit = model.config.max_position_embeddings
    if not 1 <= args.tokens <= limit - args.new_tokens or args.new_tokens < 2 or args.repeats < 1:
        parser.error(
            f"--tokens plus --new-tokens must fit the model's {limit} positions, --new-tokens at "
            "least 2 (the first token comes from the prefill) and --repeats at least 1."
        )
    input_ids = torch.tensor([build_haystack(tokenizer, args.tokens).ids])
    configurations = [("full", Full(), None), (f"{args.method} {args.budget}", method, args.budget)]
    warm_up = {name: dataclasses.replace(s, residual_length=2) for name, s in storages.items()}
    measure(model, input_ids[:, :256], METHODS[args.method](), 64, warm_up, 4)
    print(f"peak RSS after the warm-up: {peak_rss_mib():.0f} MiB", flush=True)
    passes: dict[tuple[str, str], list[Row]] = {}
    for repeat in range(args.repeats):  # rounds over every row, so drift affects all alike
        for cache, each, budget in configurations:
            rows = measure(model, input_ids, each, budget, storages, args.new_tokens)
            for storage, row in rows.items():
                passes.setdefault((cache, storage), []).append(row)
            print(
                f"measured {cache} (pass {repeat + 1} of {args.repeats}); peak RSS so far: "
                f"{peak_rss_mib():.0f} MiB",
                flush=True,
            )
    print(f"peak RSS of the process: {peak_rss_mib():.0f} MiB")
    medians = {key: median_row(rows) for key, rows in passes.items()}
    print_table(medians, args.tokens, args, args.new_tokens - 1)


if __name__ == "__main__":
    main()
