"""Peak cache memory and time per token of streaming eviction, beside the full cache.

On SmolLM2-135M-Instruct (CPU, float32, sdpa) and the first ``T`` tokens of the Paul Graham
essays (by default as many as the model's positions allow with the new tokens after them: 8064
+ 128 = 8192), one process runs, one after the other:

- the full cache, the text in one forward (the reference), and the full cache with the text in
  chunks of ``C`` tokens (what chunking alone costs);
- every method at budget ``N`` (512), the text in chunks of ``C`` (512) tokens, each followed by a
  compression, then generation compressed every ``K`` (64) tokens (:mod:`capkv.engine.streaming`);

each then generating ``--new-tokens`` (128) greedy tokens (no stop token), timed apart from the
prefill (:func:`capkv.engine.bounded.generate_bounded`). One untimed short pass comes first, so
that no row pays the process's first-call costs; ``--repeats R`` runs R rounds over all rows
and takes medians. Times are the process's CPU time, which other processes on a shared machine
do not inflate as they do wall time (with one torch thread, ``OMP_NUM_THREADS=1``, it equals the
wall time of a quiet machine); each row's wall time is shown too. The full cache's two rows read
the same cache while decoding, so their difference there shows the noise of the measurement.

Peak cache memory is counted from the cache itself, not from the process: for each layer the most
tokens any of its KV heads held at once (the length of the layer's key tensor, read after every
forward of that layer, i.e. just before each compression), times ``H_kv x head_dim x 2`` (keys
and values) times the dtype's size, summed over layers (an upper bound where layers peak at
different moments, as PyramidKV's might). The full cache's peak is at the end of generation
(``T + new - 1`` tokens per head: the last token is never fed back); its prefill peak (``T``)
is printed beside it. Memory is compared with that end-of-generation peak.

Targets (issue 14): every method's peak cache memory at most ``(N + C) / T`` of the full cache's,
and at most 1.5x the full cache's time per token (checked for the prefill, per prompt token, and
for decoding, per generated token).

    .venv/bin/python scripts/bench_streaming.py      # the table in docs/benchmarks.md (about 15 min)
    .venv/bin/python scripts/bench_streaming.py --tokens 1024 --new-tokens 16 --methods capkv
"""

from __future__ import annotations

import argparse
import statistics

import torch
from transformers import PreTrainedModel

from baselines import H2O, Full, PyramidKV, RandomEviction, SnapKV, StreamingLLM
from capkv import Budget, CapKV
from capkv.engine.bounded import generate_bounded
from capkv.engine.method import EvictionMethod
from capkv.engine.streaming import StreamSettings
from capkv.models import load_model
from capkv.tasks.haystack import build_haystack

METHODS = {
    "capkv": CapKV,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "h2o": H2O,
    "streamingllm": StreamingLLM,
    "random": RandomEviction,
}
REFERENCE = "full (one forward)"
TIME_TARGET = 1.5


def bytes_per_token(model: PreTrainedModel) -> int:
    """Bytes one token takes in one layer's cache: keys and values of every KV head."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    return config.num_key_value_heads * head_dim * 2 * itemsize


def measure(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    method: EvictionMethod,
    budget: int | None,
    settings: StreamSettings,
    new_tokens: int,
) -> dict[str, float]:
    """Peak cache memory and times of one pass of one configuration.

    Returns
    -------
    dict
        ``peak_tokens`` (the most tokens a KV head held at once, mean over layers),
        ``peak_bytes`` and ``prefill_peak_bytes`` (summed over layers: the whole pass, the
        prefill alone), ``generated`` tokens, and the prefill's and decoding's CPU seconds
        (``prefill_seconds``, ``decode_seconds``) and wall seconds (``*_wall_seconds``).
    """
    per_token = bytes_per_token(model)
    run = generate_bounded(
        model,
        input_ids,
        method,
        None if budget is None else Budget(tokens=budget),
        settings,
        new_tokens,
    )
    peak = run.record.peak_per_layer
    return {
        "peak_tokens": sum(peak) / len(peak),
        "peak_bytes": sum(peak) * per_token,
        "prefill_peak_bytes": sum(run.prefill_peak_per_layer) * per_token,
        "generated": len(run.tokens),
        "prefill_seconds": run.prefill_cpu_seconds,
        "decode_seconds": run.decode_cpu_seconds,
        "prefill_wall_seconds": run.prefill_seconds,
        "decode_wall_seconds": run.decode_seconds,
    }


def median_rows(passes: list[dict[str, float]]) -> dict[str, float]:
    """The median of every field over the passes of one configuration."""
    return {key: statistics.median(row[key] for row in passes) for key in passes[0]}


def configurations(
    methods: list[str], budget: int, chunk: int, compress_every: int
) -> list[tuple[str, EvictionMethod, int | None, StreamSettings]]:
    """(name, method, budget, settings) of every row: the full cache twice, then each method."""
    rows = [
        (REFERENCE, Full(), None, StreamSettings()),
        (f"full (chunks of {chunk})", Full(), None, StreamSettings(chunk=chunk)),
    ]
    bounded = StreamSettings(chunk=chunk, compress_every=compress_every)
    for name in methods:
        method = METHODS[name]()
        method.check_budget(Budget(tokens=budget))
        rows.append((name, method, budget, bounded))
    return rows


def print_table(rows: dict[str, dict[str, float]], tokens: int, args: argparse.Namespace) -> None:
    reference = rows[REFERENCE]
    memory_target = (args.budget + args.chunk) / tokens
    mib = 2**20
    print(
        f"\nSmolLM2-135M-Instruct, {tokens} essay tokens + {args.new_tokens} generated, budget "
        f"{args.budget}, chunk {args.chunk}, compressed every {args.compress_every} generated "
        f"tokens; batch 1, float32, sdpa, CPU ({torch.get_num_threads()} thread(s)), median of "
        f"{args.repeats} round(s)"
    )
    print(
        f"\nThe full cache's peak: {reference['prefill_peak_bytes'] / mib:.1f} MiB after the "
        f"prefill ({tokens} tokens per KV head), {reference['peak_bytes'] / mib:.1f} MiB at the "
        f"end ({reference['peak_tokens']:.0f}: the last generated token is never fed back). "
        f"Targets: peak at most (N + C) / T = {memory_target:.3f} of the full cache's, time per "
        f"token at most {TIME_TARGET}x the full cache's (prefill and decoding, CPU time).\n"
    )
    print(
        "| cache | peak tokens per KV head | peak cache (MiB) | x full cache | memory target met "
        "| prefill (CPU s) | x full | decoding (CPU ms/token) | x full | time target met "
        "| wall time (s) |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---|---:|")
    reference_per_token = reference["decode_seconds"] / max(reference["generated"], 1)
    for name, row in rows.items():
        memory = row["peak_bytes"] / reference["peak_bytes"]
        per_token = row["decode_seconds"] / max(row["generated"], 1)
        prefill_ratio = row["prefill_seconds"] / reference["prefill_seconds"]
        decode_ratio = per_token / reference_per_token
        full = name.startswith("full")
        memory_met = "" if full else yes_no(memory <= memory_target)
        time_met = "" if full else yes_no(max(prefill_ratio, decode_ratio) <= TIME_TARGET)
        wall = row["prefill_wall_seconds"] + row["decode_wall_seconds"]
        print(
            f"| {name} | {row['peak_tokens']:.0f} | {row['peak_bytes'] / mib:.1f} | "
            f"{memory:.3f} | {memory_met} | {row['prefill_seconds']:.1f} | {prefill_ratio:.2f} | "
            f"{1000 * per_token:.1f} | {decode_ratio:.2f} | {time_met} | {wall:.1f} |"
        )


def yes_no(met: bool) -> str:
    return "yes" if met else "**no**"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="text length (default: the model's limit less --new-tokens)",
    )
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--compress-every", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over every row (median)")
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD"
    )
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m", dtype="float32", attn_implementation="sdpa")
    limit = model.config.max_position_embeddings
    tokens = args.tokens or limit - args.new_tokens
    if not 1 <= tokens <= limit - args.new_tokens or args.new_tokens < 1 or args.repeats < 1:
        parser.error(
            f"--tokens plus --new-tokens must fit the model's {limit} positions, each at least 1, "
            "and --repeats at least 1."
        )
    input_ids = torch.tensor([build_haystack(tokenizer, tokens).ids])
    try:
        rows = configurations(args.methods, args.budget, args.chunk, args.compress_every)
    except ValueError as error:
        parser.error(str(error))
    warm_up = StreamSettings(chunk=128, compress_every=4)
    generate_bounded(model, input_ids[:, :256], CapKV(), Budget(tokens=64), warm_up, 8)
    passes: dict[str, list[dict[str, float]]] = {name: [] for name, *_ in rows}
    for repeat in range(args.repeats):  # rounds over every row, so drift affects all alike
        for name, method, budget, settings in rows:
            passes[name].append(
                measure(model, input_ids, method, budget, settings, args.new_tokens)
            )
            print(f"measured {name} (pass {repeat + 1} of {args.repeats})", flush=True)
    print_table({name: median_rows(rows) for name, rows in passes.items()}, tokens, args)


if __name__ == "__main__":
    main()
