"""One prefill per example for a whole sweep of (method, budget) cells.

Prefill-time eviction does not change the prefill's hidden states, so a single prefill with
every method's scoring decides the kept tokens of every cell (:func:`capkv.engine.compression.record_kept`).
Each cell then decodes from its own cache, gathered from the one full cache, and writes the
same rows into the same run directory as a separate run of that cell would. Memory holds one
full cache, the kept indices of every cell, and the caches of the example's cells while they
decode.

By default on the CPU, the cells of an example decode in lockstep
(:func:`capkv.engine.decoding.lockstep_greedy_generate`), not as one padded batch: every row's
linear layers, norms and attention run as batch 1, one row after the other, so each cell's
tokens are exactly the separate run's while each weight is read once per step for all cells. A
padded batch changes the order of floating-point reductions (matrix-matrix instead of
matrix-vector products in every linear layer, padded softmax rows), so a greedy token at a
near-tie could differ from the separate run's. On a GPU, batch-1 work leaves the device idle
(it is bound by per-step overhead), so by default the cells of an example decode together
(``decode_batch``, :func:`capkv.engine.decoding.batched_greedy_generate`): their caches padded per
layer and masked, in groups whose padding stays below half their real tokens, each row leaving
its batch when it stops.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from tqdm import tqdm
from transformers import DynamicCache, PreTrainedModel

from capkv.analysis.diagnostics import CapacityProbe, attention_errors, decoding_queries
from capkv.engine.compression import CompressionRecord, record_kept
from capkv.engine.decoding import check_batchable
from capkv.harness.runner import (
    Cell,
    check_protocol,
    decode,
    decoding_start,
    prefill,
    prefill_ids,
    prepared_examples,
    result_row,
)
from capkv.tasks.base import Task
from capkv.tasks.prompting import PromptIds

log = logging.getLogger(__name__)


def measure(
    model: PreTrainedModel,
    full_cache: DynamicCache,
    prompt: PromptIds,
    protocol: str,
    last_logits,
    records: list,
    probe: CapacityProbe | None,
) -> list[dict[str, float]] | None:
    """Capacity fraction and attention error of every record (None without a probe)."""
    if probe is None:
        return None
    start, fed = decoding_start(prompt, protocol, last_logits)
    first = fed["input_ids"] if "input_ids" in fed else last_logits.argmax().view(1, 1)
    queries = decoding_queries(model, full_cache, first, start)
    errors = attention_errors(model, full_cache, queries, records)
    return [
        {"capacity_fraction": probe.mean(i), "attention_error": errors[i]}
        for i in range(len(records))
    ]


MAX_PADDING = 0.5  # a decoding group's padding at most this fraction of its real tokens


def decoding_groups(records: list[CompressionRecord]) -> list[list[int]]:
    """Indices of ``records`` in groups to decode as one batch each, longest caches first.

    A cell joins the current group while the group's padded cache (every layer as long as its
    longest member's) stays within ``1 + MAX_PADDING`` times its real tokens, so a full-cache
    cell does not pad every compressed cell to the whole prompt. A cell whose KV heads keep
    different numbers of tokens (:meth:`CompressionRecord.ragged`) carries a per-head mask that
    the batch's padding mask cannot hold: it forms a group of its own, decoded one by one.
    """
    lengths = [record.kept_per_layer() for record in records]
    order = sorted(range(len(records)), key=lambda i: -sum(lengths[i]))
    groups: list[list[int]] = [[i] for i in order if records[i].ragged()]
    batchable = [i for i in order if not records[i].ragged()]
    for index in batchable:
        if groups and not records[groups[-1][0]].ragged():
            members = [*groups[-1], index]
            longest = [max(layer) for layer in zip(*(lengths[i] for i in members), strict=True)]
            padded = len(members) * sum(longest)
            if padded <= (1 + MAX_PADDING) * sum(sum(lengths[i]) for i in members):
                groups[-1].append(index)
                continue
        groups.append([index])
    return groups


def uses_batched_decoding(model: PreTrainedModel, decode_batch: bool | None) -> bool:
    """``decode_batch``, or by default: on CUDA where the attention takes padding masks."""
    if decode_batch is None:
        try:
            check_batchable(model)
        except ValueError:
            return False
        return model.device.type == "cuda"
    if decode_batch:
        check_batchable(model)
    return decode_batch


def run_sweep(
    model: PreTrainedModel,
    tokenizer: Any,
    task: Task,
    cells: list[Cell],
    protocol: str,
    diagnostics: bool = False,
    decode_batch: bool | None = None,
) -> list[dict[str, Any]]:
    """Run every example that some cell has not finished; return each cell's metrics.

    Per example: one prefill records the kept tokens of the cells still to do, then each of
    those cells decodes from its gathered cache (all in lockstep, exactly as one by one, or with
    ``decode_batch`` in padded batches; None: batched on CUDA only) and appends its row. With ``diagnostics``, each
    row also holds the retained capacity fraction and the attention-output error of its kept
    set (:mod:`capkv.analysis.diagnostics`). The cells' logs name one shard of examples (all of them
    by default); only its examples run, each for every cell.
    """
    check_protocol(protocol)
    (shard,) = {cell.log.shard for cell in cells}
    # A batch pads full-precision caches together; quantized ones decode in lockstep.
    quantized = any(cell.quantization.active for cell in cells)
    batched = uses_batched_decoding(model, decode_batch) and not quantized
    plan = prepared_examples(model, tokenizer, task, shard)
    try:
        for cell in cells:
            cell.log.start(plan.example_ids)
        examples = plan.prepared
        todo = [(e, p) for e, p in examples if any(e.example_id not in c.log.done for c in cells)]
        log.info(
            "sweep of %d cells over %d examples of %s (%d to do)",
            len(cells),
            len(examples),
            shard.label,
            len(todo),
        )
        for example, prompt in tqdm(todo, desc=f"sweep of {len(cells)} cells", unit="example"):
            pending = [cell for cell in cells if example.example_id not in cell.log.done]
            start = time.perf_counter()
            full_cache = DynamicCache()
            selections = [(cell.method, cell.budget) for cell in pending]
            probe = CapacityProbe(len(pending)) if diagnostics else None
            on_layer = probe.on_layer if probe is not None else None
            with record_kept(model, selections, on_layer) as records:
                last_logits = prefill(model, prefill_ids(prompt, protocol), full_cache)
            measured = measure(model, full_cache, prompt, protocol, last_logits, records, probe)
            prefill_seconds = (time.perf_counter() - start) / len(pending)
            outputs = {}  # cell index: (prediction, decoding seconds)
            groups = decoding_groups(records) if batched else [list(range(len(pending)))]
            for group in groups:
                start = time.perf_counter()
                caches = [pending[i].decoding_cache(full_cache, records[i]) for i in group]
                predictions = decode(
                    model,
                    tokenizer,
                    caches,
                    prompt,
                    protocol,
                    last_logits,
                    example.max_new_tokens,
                    batched=batched,
                )
                del caches
                seconds = (time.perf_counter() - start) / len(group)
                outputs.update({i: (p, seconds) for i, p in zip(group, predictions, strict=True)})
            for index, (cell, record) in enumerate(zip(pending, records, strict=True)):
                prediction, seconds = outputs[index]
                row = result_row(
                    task, example, prompt, prediction, record, prefill_seconds + seconds
                )
                if measured is not None:
                    row["diagnostics"] = measured[index]
                cell.log.append(row)
    finally:
        metrics = [cell.log.close() for cell in cells]
    return metrics
