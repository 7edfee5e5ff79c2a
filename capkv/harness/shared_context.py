"""Compress once, ask many: every question of a context answered from one compressed cache.

Real use compresses a long context once and then answers questions that the compression never
saw: a chat over a document, an assistant over a repository. SCBench (Li et al. 2024, "SCBench:
A KV Cache-Centric Analysis of Long-Context Methods", arXiv 2412.10319) calls this the
multi-request setting and finds that query-aware methods lose much of their lead in it. Here a
task's examples that share a context (identical token ids before the question) form one
:class:`ContextGroup`, asked in the order the task yields them:

- ``shared_context``: the prefill holds the context alone; each question is fed after the
  compressed cache, answered greedily, and cropped off again (every layer back to its compressed
  length), so each answer sees exactly what ``context_only`` would give it;
- ``shared_first_question``: the prefill holds the context and the first question (query-aware
  for turn 1, as a chat's first turn is); the first answer follows from the prefill and stays,
  and every later question is fed after that first turn as the next user turn of the chat
  template (:func:`followup_ids`), then cropped off again.

With ``accumulate`` (the multi-turn variant) nothing is cropped: each answer stays in the cache,
and the next question follows it as a new user turn of the model's chat template
(:func:`followup_ids`). Positions keep counting the uncompressed conversation.

One prefill per context serves every question, and in sweep mode every (method, budget) cell
(:func:`run_shared_sweep`, like :func:`capkv.harness.sweep.run_sweep` with contexts in place of
examples). Each row is one question: the usual fields plus ``turn`` (1-based, in asking order),
``turns`` (questions asked of its context) and ``context`` (the id of the context's first
question). A context's prefill time is shared evenly by its questions' rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm
from transformers import Cache, DynamicCache, PreTrainedModel

from capkv.analysis.diagnostics import CapacityProbe
from capkv.engine.compression import CompressionRecord, evict, record_kept
from capkv.engine.decoding import batched_greedy_generate, greedy_generate
from capkv.engine.streaming import streamed
from capkv.harness.runner import (
    Cell,
    answer_text,
    check_fits,
    prefill,
    result_row,
    stop_token_ids,
    stored,
    text_limit,
)
from capkv.harness.shards import Shard, select_shard
from capkv.harness.sweep import decoding_groups, measure, uses_batched_decoding
from capkv.tasks.base import Example, Task
from capkv.tasks.prompting import PromptIds, tokenize_prompt

log = logging.getLogger(__name__)

# The single-question protocol whose prefill and first decoding step each one's turn 1 shares.
FIRST_TURN_PROTOCOL = {"shared_context": "context_only", "shared_first_question": "query_aware"}
_ANSWER = "\x00CAPKV-ANSWER-ENDS-HERE\x00"


@dataclass
class ContextGroup:
    """The questions of one context, in asking order, with their token ids.

    Attributes
    ----------
    key : str
        The example id of the first question: the ``context`` field of every row of the group.
    questions : list of (Example, PromptIds)
        Each question's example and prompt ids; every prompt has the same ``context_ids``.
    """

    key: str
    questions: list[tuple[Example, PromptIds]]

    @property
    def example_ids(self) -> list[str]:
        return [example.example_id for example, _ in self.questions]

    def compressed_ids(self, protocol: str) -> torch.Tensor:
        """What the prefill reads and compresses: the context, or the context and the first
        question."""
        first = self.questions[0][1]
        return first.context_ids if protocol == "shared_context" else first.full()

    def base_position(self, protocol: str) -> int:
        """Where each question asked after the compression starts (without ``accumulate``)."""
        return self.compressed_ids(protocol).shape[1]


@dataclass
class SharedPlan:
    """What one process runs of a task in a shared-context protocol: every example id of the
    task (what a cell holds when all its shards are done) and the contexts of its own shard."""

    example_ids: list[str]
    groups: list[ContextGroup]


def context_groups(prepared: list[tuple[Example, PromptIds]]) -> list[ContextGroup]:
    """Examples with identical context token ids as one group each, in order of first
    appearance; within a group, in the task's order."""
    groups: dict[tuple[int, ...], ContextGroup] = {}
    for example, prompt in prepared:
        key = tuple(prompt.context_ids[0].tolist())
        if key not in groups:
            groups[key] = ContextGroup(example.example_id, [])
        groups[key].questions.append((example, prompt))
    return list(groups.values())


def shared_plan(
    model: PreTrainedModel, tokenizer: Any, task: Task, shard: Shard, accumulate: bool
) -> SharedPlan:
    """The contexts of ``task`` in ``shard``, each checked to fit the model before any runs.

    Shards deal whole contexts (a context's questions are answered from one prefill, and with
    ``accumulate`` each answer depends on the earlier ones): a context goes where its first
    question would.
    """
    examples = list(task.examples(tokenizer, text_limit(model, tokenizer, task)))
    prepared = [(example, tokenize_prompt(tokenizer, example)) for example in examples]
    groups = context_groups(prepared)
    firsts = {group.questions[0][0].example_id: group for group in groups}
    chosen = select_shard([group.questions[0][0] for group in groups], shard)
    mine = [firsts[example.example_id] for example in chosen]
    for group in mine:
        for example, prompt in group.questions:
            check_fits(model, example, prompt)
        if accumulate:
            check_conversation_fits(model, tokenizer, group)
    return SharedPlan([example.example_id for example in examples], mine)


def check_conversation_fits(model: PreTrainedModel, tokenizer: Any, group: ContextGroup) -> None:
    """Raise when a context's whole conversation (every question and answer kept) could run
    past the model's positions."""
    first_example, first_prompt = group.questions[0]
    needed = first_prompt.length + first_example.max_new_tokens
    for example, _ in group.questions[1:]:
        needed += followup_ids(tokenizer, example).shape[1] + example.max_new_tokens
    window = model.config.max_position_embeddings
    if needed > window:
        raise ValueError(
            f"The {len(group.questions)} turns of context {group.key} need up to {needed} "
            f"positions with accumulate=true but the model allows {window}: ask fewer "
            "questions per context, choose shorter contexts, or drop accumulate=true."
        )


def followup_ids(tokenizer: Any, example: Example) -> torch.Tensor:
    """Token ids (1, n) that follow an answer kept in the cache and ask ``example``'s question as
    the next user turn: the chat template's end of the assistant turn, the user turn with the
    question, the assistant header and the answer prefix (without a template, the question after
    a blank line)."""
    question = example.question.lstrip()
    if example.use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "user", "content": "context"},
            {"role": "assistant", "content": _ANSWER},
            {"role": "user", "content": question},
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        after = text.split(_ANSWER, 1)[1]
    else:
        after = "\n\n" + question
    ids = tokenizer(after + example.answer_prefix, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


def layer_lengths(cache: Cache) -> list[int]:
    """Tokens each layer's cache holds (its slots: a head-adaptive layer's padding included)."""
    return [layer.keys.shape[-2] for layer in cache.layers]


def crop_layers(cache: Cache, lengths: list[int]) -> None:
    """Cut every layer's cache back to its first ``lengths[layer]`` slots: what a turn added is
    dropped, the compressed context (and a head-adaptive layer's mask of it) left as it was."""
    for layer, length in zip(cache.layers, lengths, strict=True):
        layer.keys = layer.keys[..., :length, :]
        layer.values = layer.values[..., :length, :]


@dataclass
class Turn:
    """One question's answer: its tokens and the seconds spent decoding it."""

    tokens: list[int]
    seconds: float


def answer_turns(
    model: PreTrainedModel,
    tokenizer: Any,
    cache: Cache,
    group: ContextGroup,
    protocol: str,
    last_logits: torch.Tensor,
    accumulate: bool = False,
    skip: frozenset[str] = frozenset(),
) -> dict[int, Turn]:
    """Answer the questions of ``group`` one after another from ``cache``, the compressed
    prefill of :meth:`ContextGroup.compressed_ids`, whose last logits are ``last_logits``.

    Without ``accumulate`` each question starts from the same cache (what a question added is
    cropped off after its answer) and the questions in ``skip`` (already answered) are left out:
    the compressed context (``shared_context``), or the compressed first question with its
    answer (``shared_first_question``: turn 1 is a whole chat turn, always answered, and every
    later question follows it as the next user turn). With ``accumulate`` every turn stays, and
    every question is answered (each depends on the earlier answers). Returns each answered
    question's :class:`Turn` by its index in the group.
    """
    stops = stop_token_ids(model, tokenizer)
    base = layer_lengths(cache)  # what each question is cropped back to
    position = group.base_position(protocol)
    previous: list[int] | None = None  # the last answer kept in the cache
    turns = {}
    for index, (example, prompt) in enumerate(group.questions):
        first_kept = index == 0 and protocol == "shared_first_question"
        if not (accumulate or first_kept) and example.example_id in skip:
            continue
        start_time = time.perf_counter()
        if first_kept:
            start, fed = prompt.length, {"next_token_logits": last_logits}
        elif previous is None:
            start, fed = position, {"input_ids": prompt.question_ids}
        else:
            start, fed = position, {"input_ids": after_answer(previous, stops, tokenizer, example)}
        tokens = greedy_generate(model, cache, start, example.max_new_tokens, stops, **fed)
        if accumulate or first_kept:
            fed_length = fed["input_ids"].shape[1] if "input_ids" in fed else 0
            position = start + fed_length + len(tokens) - 1  # the last token is not yet cached
            previous = tokens
            base = layer_lengths(cache)
        else:
            crop_layers(cache, base)
        turns[index] = Turn(tokens, time.perf_counter() - start_time)
    return turns


def after_answer(
    previous: list[int], stops: list[int], tokenizer: Any, example: Example
) -> torch.Tensor:
    """What is fed after a kept answer: its last token (generated, not yet in the cache) unless
    it is a stop token, which the template's end of turn replaces, then the next question."""
    last = [] if previous[-1] in stops else previous[-1:]
    return torch.cat([torch.tensor([last], dtype=torch.long), followup_ids(tokenizer, example)], 1)


def answer_turns_together(
    model: PreTrainedModel,
    tokenizer: Any,
    caches: list[Cache],
    group: ContextGroup,
    protocol: str,
    last_logits: torch.Tensor,
) -> list[dict[int, Turn]]:
    """:func:`answer_turns` of ``shared_context`` without ``accumulate`` for several caches of
    one context at once,
    each question as one padded batch (:func:`capkv.engine.decoding.batched_greedy_generate`,
    which leaves the caches as they were)."""
    stops = stop_token_ids(model, tokenizer)
    answers: list[dict[int, Turn]] = [{} for _ in caches]
    for index, (example, prompt) in enumerate(group.questions):
        start_time = time.perf_counter()
        start, fed = group.base_position("shared_context"), {"input_ids": prompt.question_ids}
        generated = batched_greedy_generate(
            model, caches, start, example.max_new_tokens, stops, **fed
        )
        seconds = (time.perf_counter() - start_time) / len(caches)
        for turns, tokens in zip(answers, generated, strict=True):
            turns[index] = Turn(tokens, seconds)
    return answers


def turn_rows(
    task: Task,
    tokenizer: Any,
    group: ContextGroup,
    turns: dict[int, Turn],
    record: CompressionRecord,
    prefill_seconds: float,
    done: set[str],
) -> Iterator[dict[str, Any]]:
    """The rows of the answered questions not yet ``done``, each with ``turn``, ``turns`` and
    ``context``; the prefill's seconds shared evenly by the group's questions."""
    share = prefill_seconds / len(group.questions)
    for index, (example, prompt) in enumerate(group.questions):
        if index not in turns or example.example_id in done:
            continue
        turn = turns[index]
        prediction = answer_text(tokenizer, turn.tokens)
        row = result_row(task, example, prompt, prediction, record, share + turn.seconds)
        yield {**row, "turn": index + 1, "turns": len(group.questions), "context": group.key}


def pending_groups(groups: list[ContextGroup], cells: list[Cell]) -> list[ContextGroup]:
    """The contexts some cell has a question of still to answer."""
    return [
        group
        for group in groups
        if any(
            example_id not in cell.log.done for cell in cells for example_id in group.example_ids
        )
    ]


@contextmanager
def compressing(
    model: PreTrainedModel, cell: Cell
) -> Iterator[tuple[CompressionRecord, Callable[[torch.Tensor, Cache], torch.Tensor]]]:
    """A cell's compression of a context, and how the context is read into it: one prefill
    evicted at its end, or (with the cell's ``chunk``) read in chunks, each followed by a
    compression (:mod:`capkv.engine.streaming`); decoding inside stays bounded by neither (its
    turns are cropped off). Yields the record and ``read(ids, cache) -> last logits``."""
    if cell.stream.active:
        with streamed(model, cell.method, cell.budget, settings=cell.stream) as streamer:
            yield streamer.record, streamer.prefill
        return
    with evict(model, cell.method, budget=cell.budget) as record:
        yield record, lambda ids, cache: prefill(model, ids, cache)


def run_shared_cell(
    model: PreTrainedModel,
    tokenizer: Any,
    task: Task,
    cell: Cell,
    protocol: str,
    accumulate: bool = False,
) -> dict[str, Any]:
    """One cell under a shared-context protocol: per context, one prefill with eviction, then
    every question still to answer; rows and metrics as :func:`capkv.harness.runner.run_cell`
    writes them."""
    plan = shared_plan(model, tokenizer, task, cell.shard, accumulate)
    cell.log.start(plan.example_ids)
    todo = pending_groups(plan.groups, [cell])
    try:
        label = f"{cell.identity['method']} {cell.identity['budget']}"
        for group in tqdm(todo, desc=label, unit="context"):
            start = time.perf_counter()
            cache = DynamicCache()
            with compressing(model, cell) as (record, read):
                last_logits = read(group.compressed_ids(protocol), cache)
                cache = stored(cache, record, cell.quantization, cell.measure_bytes)
                prefill_seconds = time.perf_counter() - start
                done = frozenset(cell.log.done)
                turns = answer_turns(
                    model, tokenizer, cache, group, protocol, last_logits, accumulate, done
                )
            for row in turn_rows(task, tokenizer, group, turns, record, prefill_seconds, done):
                cell.log.append(row)
    finally:
        metrics = cell.log.close()
    return metrics


def run_shared_sweep(
    model: PreTrainedModel,
    tokenizer: Any,
    task: Task,
    cells: list[Cell],
    protocol: str,
    accumulate: bool = False,
    diagnostics: bool = False,
    decode_batch: bool | None = None,
) -> list[dict[str, Any]]:
    """Every (method, budget) cell under a shared-context protocol with one prefill per
    context for all of them: each cell gathers its cache from the one full cache and answers
    the context's questions from it (decoded together with ``decode_batch``, where nothing
    accumulates). With ``diagnostics`` each row holds the capacity and attention error of its
    cell's kept set, measured at the context's first question."""
    # Together only where every cache answers from the same point (not after its own answers).
    batched = uses_batched_decoding(model, decode_batch) and not accumulate
    batched = batched and protocol == "shared_context"
    (shard,) = {cell.log.shard for cell in cells}
    plan = shared_plan(model, tokenizer, task, shard, accumulate)
    try:
        for cell in cells:
            cell.log.start(plan.example_ids)
        todo = pending_groups(plan.groups, cells)
        log.info(
            "shared-context sweep of %d cells over %d contexts of %s (%d to do)",
            len(cells),
            len(plan.groups),
            shard.label,
            len(todo),
        )
        for group in tqdm(todo, desc=f"sweep of {len(cells)} cells", unit="context"):
            pending = [
                cell for cell in cells if any(i not in cell.log.done for i in group.example_ids)
            ]
            start = time.perf_counter()
            full_cache = DynamicCache()
            probe = CapacityProbe(len(pending)) if diagnostics else None
            on_layer = probe.on_layer if probe is not None else None
            selections = [(cell.method, cell.budget) for cell in pending]
            with record_kept(model, selections, on_layer) as records:
                last_logits = prefill(model, group.compressed_ids(protocol), full_cache)
            first = group.questions[0][1]
            measured = measure(
                model, full_cache, first, FIRST_TURN_PROTOCOL[protocol], last_logits, records, probe
            )
            prefill_seconds = (time.perf_counter() - start) / len(pending)
            answers: dict[int, dict[int, Turn]] = {}
            for members in (
                decoding_groups(records) if batched else [[i] for i in range(len(pending))]
            ):
                caches = [pending[i].decoding_cache(full_cache, records[i]) for i in members]
                if len(caches) > 1:
                    together = answer_turns_together(
                        model, tokenizer, caches, group, protocol, last_logits
                    )
                    answers.update(zip(members, together, strict=True))
                else:
                    done = frozenset(pending[members[0]].log.done)
                    answers[members[0]] = answer_turns(
                        model, tokenizer, caches[0], group, protocol, last_logits, accumulate, done
                    )
                del caches
            for index, (cell, record) in enumerate(zip(pending, records, strict=True)):
                done = set(cell.log.done)
                for row in turn_rows(
                    task, tokenizer, group, answers[index], record, prefill_seconds, done
                ):
                    if measured is not None:
                        row["diagnostics"] = measured[index]
                    cell.log.append(row)
    finally:
        metrics = [cell.log.close() for cell in cells]
    return metrics
