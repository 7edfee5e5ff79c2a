"""Greedy generation of a fixed length under a bound: the prompt read in chunks, the cache
compressed as it goes (:func:`capkv.engine.streaming.streamed`), the two phases timed apart.

The one home of :func:`generate_bounded`, which the long-generation task
(:mod:`capkv.tasks.long_generation`) and the streaming benchmark (``scripts/bench_streaming.py``)
both call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from capkv.engine.budget import Budget
from capkv.engine.decoding import greedy_generate
from capkv.engine.method import EvictionMethod
from capkv.engine.streaming import StreamRecord, StreamSettings, check_positions, streamed


@dataclass
class BoundedGeneration:
    """A greedy continuation under a bound, what the cache held and how long it took.

    Times are wall-clock seconds and the process's CPU seconds (which other processes on a
    shared machine do not inflate; with one torch thread they equal the wall time of a quiet
    machine) of the prefill and of the generation.
    """

    tokens: list[int]
    record: StreamRecord  # what was kept, and the peak over the whole pass
    prefill_peak_per_layer: list[int]  # the peak while the prompt was read
    final_per_layer: list[int]  # tokens per KV head in each layer's cache at the end
    prefill_seconds: float
    decode_seconds: float
    prefill_cpu_seconds: float
    decode_cpu_seconds: float


def generate_bounded(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    method: EvictionMethod,
    budget: Budget | None,
    settings: StreamSettings,
    new_tokens: int,
) -> BoundedGeneration:
    """Read ``input_ids`` (1, T) and generate exactly ``new_tokens`` greedy tokens inside
    :func:`capkv.engine.streaming.streamed` (no stop token), timing the two phases apart.

    Parameters
    ----------
    model : PreTrainedModel
        The model.
    input_ids : torch.Tensor
        The prompt's token ids, (1, T).
    method : EvictionMethod
        What evicts (the full cache included).
    budget : Budget or None
        What the cache keeps; None for the full cache, which reads the prompt in the same
        chunks.
    settings : StreamSettings
        How the prompt is read and generation compressed.
    new_tokens : int
        Tokens to generate; end-of-sequence tokens do not stop generation.

    Returns
    -------
    BoundedGeneration
        The tokens, what the cache held and the times.
    """
    check_positions(model, input_ids.shape[1], new_tokens)
    cache = DynamicCache()
    with streamed(model, method, budget, settings=settings) as streamer:
        start, start_cpu = time.perf_counter(), time.process_time()
        last_logits = streamer.prefill(input_ids, cache)
        middle, middle_cpu = time.perf_counter(), time.process_time()
        prefill_peak = list(streamer.record.peak_per_layer)
        tokens = greedy_generate(
            model, cache, input_ids.shape[1], new_tokens, (), next_token_logits=last_logits
        )
        end, end_cpu = time.perf_counter(), time.process_time()
    return BoundedGeneration(
        tokens=tokens,
        record=streamer.record,
        prefill_peak_per_layer=prefill_peak,
        final_per_layer=[layer.keys.shape[2] for layer in cache.layers],
        prefill_seconds=middle - start,
        decode_seconds=end - middle,
        prefill_cpu_seconds=middle_cpu - start_cpu,
        decode_cpu_seconds=end_cpu - middle_cpu,
    )
