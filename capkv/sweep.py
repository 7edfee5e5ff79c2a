"""One prefill per example for a whole sweep of (method, budget) cells.

Prefill-time eviction does not change the prefill's hidden states, so a single prefill with
every method's scoring decides the kept tokens of every cell (:func:`capkv.engine.record_kept`).
Each cell then decodes from its own cache, gathered from the one full cache, and writes the
same rows into the same run directory as a separate run of that cell would. Memory holds one
full cache, the kept indices of every cell, and the cache of the cell being decoded.

Cells are decoded one after the other, not as one padded batch: a batch changes the order of
floating-point reductions (matrix-matrix instead of matrix-vector products in every linear
layer, padded softmax rows), so a greedy token at a near-tie could differ from the separate
run's, and the sweep must give exactly the separate runs' outputs. Decoding is a small part of
an example's cost next to the prefill on long prompts, so little is lost.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from tqdm import tqdm
from transformers import DynamicCache, PreTrainedModel

from capkv.diagnostics import CapacityProbe, attention_errors, decoding_queries
from capkv.engine import gathered_cache, record_kept
from capkv.prompting import PromptIds
from capkv.runner import (
    Cell,
    check_protocol,
    decode,
    prefill,
    prefill_ids,
    prepared_examples,
    result_row,
)
from capkv.tasks.base import Task

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
    if protocol == "query_aware":
        fed, start = last_logits.argmax().view(1, 1), prompt.length
    else:
        fed, start = prompt.question_ids, prompt.context_ids.shape[1]
    queries = decoding_queries(model, full_cache, fed, start)
    errors = attention_errors(model, full_cache, queries, records)
    return [
        {"capacity_fraction": probe.mean(i), "attention_error": errors[i]}
        for i in range(len(records))
    ]


def run_sweep(
    model: PreTrainedModel,
    tokenizer: Any,
    task: Task,
    cells: list[Cell],
    protocol: str,
    diagnostics: bool = False,
) -> list[dict[str, Any]]:
    """Run every example that some cell has not finished; return each cell's metrics.

    Per example: one prefill records the kept tokens of the cells still to do, then each of
    those cells decodes from its gathered cache and appends its row. With ``diagnostics``, each
    row also holds the retained capacity fraction and the attention-output error of its kept
    set (:mod:`capkv.diagnostics`). The cells' logs name one shard of examples (all of them
    by default); only its examples run, each for every cell.
    """
    check_protocol(protocol)
    (shard,) = {cell.log.shard for cell in cells}
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
            for index, (cell, record) in enumerate(zip(pending, records, strict=True)):
                start = time.perf_counter()
                cell_cache = gathered_cache(full_cache, record)
                prediction = decode(
                    model,
                    tokenizer,
                    cell_cache,
                    prompt,
                    protocol,
                    last_logits,
                    example.max_new_tokens,
                )
                seconds = prefill_seconds + time.perf_counter() - start
                row = result_row(task, example, prompt, prediction, record, seconds)
                if measured is not None:
                    row["diagnostics"] = measured[index]
                cell.log.append(row)
    finally:
        metrics = [cell.log.close() for cell in cells]
    return metrics
