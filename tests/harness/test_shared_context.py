"""Compress once, ask many: the shared-context protocols against what each question alone gives."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from baselines import H2O, Full, PyramidKV, SnapKV, StreamingLLM
from capkv import Budget, CapKV, evict
from capkv.engine.decoding import greedy_generate
from capkv.engine.streaming import StreamSettings
from capkv.harness.runner import Cell, prefill, run_cell, stop_token_ids
from capkv.harness.shards import UNSHARDED, Shard
from capkv.harness.shared_context import (
    answer_turns,
    context_groups,
    crop_layers,
    followup_ids,
    layer_lengths,
    run_shared_cell,
    run_shared_sweep,
)
from capkv.models import build_tiny_model
from capkv.results.store import finished_rows
from capkv.tasks.base import Example, Reporting
from capkv.tasks.needle import NeedleTask
from capkv.tasks.prompting import tokenize_prompt

METHODS = {
    "capkv": CapKV(),
    "snapkv": SnapKV(window=8),
    "pyramidkv": PyramidKV(window=8),
    "h2o": H2O(window=8, chunk=64),
    "streamingllm": StreamingLLM(),
    "full": Full(),
    "snapkv_adaptive": SnapKV(window=8, allocation="adaptive"),
    "capkv_model": CapKV(allocation="model"),
}
TURN_FIELDS = ("turn", "turns", "context")
FOLLOWUPS = (
    "\n\nWhat is the first word of the text?",
    "\n\nHow many essays does the text hold?",
)


@dataclass
class AskedTwice:
    """A needle grid whose every context is asked ``1 + len(followups)`` questions: the
    needle's own, then the follow-ups (a task with several questions per context)."""

    needle: NeedleTask = field(
        default_factory=lambda: NeedleTask(context_lengths=[250, 500], depths=[0, 100])
    )
    followups: tuple[str, ...] = FOLLOWUPS
    name: str = "asked_twice"

    @classmethod
    def reporting(cls, config: Any) -> Reporting:
        return Reporting("custom", "exact")

    def shares_contexts(self) -> bool:
        return bool(self.followups)

    def examples(self, tokenizer: Any, max_prompt_tokens: int) -> Iterator[Example]:
        for example in self.needle.examples(tokenizer, max_prompt_tokens):
            yield example
            for index, question in enumerate(self.followups):
                yield replace(
                    example, example_id=f"{example.example_id}_f{index}", question=question
                )

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        return self.needle.score(prediction, example)


def identity(name: str, budget: Budget | None, protocol: str) -> dict[str, Any]:
    return {
        "model": "tiny",
        "task": "t",
        "method": name,
        "budget": budget.label if budget is not None else "full",
        "protocol": protocol,
    }


def cell(folder, name: str, budget: Budget | None, protocol: str, shard: Shard = UNSHARDED) -> Cell:
    method = METHODS[name]
    budget = budget if method.evicts else None
    return Cell(method, budget, folder / name, identity(name, budget, protocol), shard)


def without(row: dict[str, Any], keys=("seconds", *TURN_FIELDS)) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key not in keys}


@pytest.fixture(scope="module")
def eager_model():
    return build_tiny_model(
        seed=0, num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager"
    )


@pytest.mark.parametrize("name", list(METHODS))
def test_one_question_per_context_gives_the_context_only_rows(name, tmp_path, gqa_model):
    model, tokenizer = gqa_model
    task = NeedleTask(context_lengths=[250, 500], depths=[0, 100])
    budget = Budget(tokens=48)
    run_cell(model, tokenizer, task, cell(tmp_path / "alone", name, budget, "x"), "context_only")
    run_shared_cell(
        model, tokenizer, task, cell(tmp_path / "shared", name, budget, "x"), "shared_context"
    )
    alone = finished_rows(tmp_path / "alone" / name)
    shared = finished_rows(tmp_path / "shared" / name)
    assert len(alone) == len(shared) == 4
    assert [without(row) for row in shared] == [without(row) for row in alone]
    assert [(row["turn"], row["turns"], row["context"]) for row in shared] == [
        (1, 1, row["example_id"]) for row in alone
    ]


STREAMABLE = ["capkv", "snapkv", "pyramidkv", "h2o", "streamingllm"]


@pytest.mark.parametrize("name", STREAMABLE)
def test_a_context_read_in_chunks_answers_each_question_as_context_only_streaming_does(
    name, tmp_path, gqa_model
):
    model, tokenizer = gqa_model
    task = AskedTwice(NeedleTask(context_lengths=[300], depths=[50]))
    budget, stream = Budget(tokens=48), StreamSettings(chunk=64)
    alone = replace(cell(tmp_path / "alone", name, budget, "x"), stream=stream)
    shared = replace(cell(tmp_path / "shared", name, budget, "x"), stream=stream)
    run_cell(model, tokenizer, task, alone, "context_only")
    run_shared_cell(model, tokenizer, task, shared, "shared_context")
    separate, together = finished_rows(alone.run_dir), finished_rows(shared.run_dir)
    assert len(separate) == len(together) == 3
    peaks = [row.pop("peak_tokens_per_layer") for row in (*separate, *together)]
    assert [without(row) for row in together] == [without(row) for row in separate]
    # One record per context: its peak is the most any of its questions made a layer hold.
    assert peaks[3:] == [[max(layer) for layer in zip(*peaks[:3], strict=True)]] * 3


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(METHODS))
def test_each_cropped_turn_equals_a_fresh_decode_from_the_compressed_cache(
    name, attention, gqa_model, eager_model
):
    model, tokenizer = gqa_model if attention == "sdpa" else eager_model
    task = AskedTwice(NeedleTask(context_lengths=[300], depths=[50]))
    prepared = [(e, tokenize_prompt(tokenizer, e)) for e in task.examples(tokenizer, 10_000)]
    (group,) = context_groups(prepared)
    assert len(group.questions) == 3
    method = METHODS[name]
    budget = Budget(tokens=48) if method.evicts else None
    stops = stop_token_ids(model, tokenizer)
    for protocol in ("shared_context", "shared_first_question"):
        cache = DynamicCache()
        with evict(model, method, budget=budget):
            last_logits = prefill(model, group.compressed_ids(protocol), cache)
            compressed = copy.deepcopy(cache)
            turns = answer_turns(model, tokenizer, cache, group, protocol, last_logits)
        start = group.base_position(protocol)
        if protocol == "shared_first_question":  # turn 1 is a whole chat turn, kept
            example, prompt = group.questions[0]
            first = greedy_generate(
                model, compressed, prompt.length, example.max_new_tokens, stops,
                next_token_logits=last_logits,
            )  # fmt: skip
            assert turns[0].tokens == first
            start = prompt.length + len(first) - 1
        for mine, theirs in zip(cache.layers, compressed.layers, strict=True):
            assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
        for index, (example, prompt) in enumerate(group.questions):
            if protocol == "shared_first_question" and index == 0:
                continue
            fresh = copy.deepcopy(compressed)
            if protocol == "shared_context":
                fed = prompt.question_ids  # what context_only feeds
            else:  # the first answer's last token, then the next user turn
                last = [] if first[-1] in stops else first[-1:]
                fed = torch.cat([torch.tensor([last]), followup_ids(tokenizer, example)], dim=1)
            expected = greedy_generate(
                model, fresh, start, example.max_new_tokens, stops, input_ids=fed
            )
            assert turns[index].tokens == expected, (protocol, index)


def test_crop_layers_restores_lengths_that_differ_by_layer(gqa_model):
    model, tokenizer = gqa_model
    prompt = tokenize_prompt(
        tokenizer, next(NeedleTask(context_lengths=[300], depths=[0]).examples(tokenizer, 9999))
    )
    cache = DynamicCache()
    with evict(model, PyramidKV(window=8), budget=Budget(tokens=48)):
        prefill(model, prompt.context_ids, cache)
        lengths = layer_lengths(cache)
        assert len(set(lengths)) > 1, "PyramidKV keeps a budget per layer"
        greedy_generate(
            model, cache, prompt.context_ids.shape[1], 4, (), input_ids=prompt.question_ids
        )
        assert layer_lengths(cache) != lengths
        crop_layers(cache, lengths)
    assert layer_lengths(cache) == lengths


@pytest.mark.parametrize("protocol", ["shared_context", "shared_first_question"])
def test_the_sweep_gives_each_cell_what_its_own_run_gives(protocol, tmp_path, gqa_model):
    model, tokenizer = gqa_model
    task = AskedTwice()
    budgets = [Budget(tokens=48), Budget(ratio=0.5)]
    cells = [(n, b) for n in METHODS for b in (budgets if METHODS[n].evicts else [None])]
    sweep = [cell(tmp_path / "sweep" / str(i), n, b, protocol) for i, (n, b) in enumerate(cells)]
    run_shared_sweep(model, tokenizer, task, sweep, protocol)
    predictions = set()
    for i, (name, budget) in enumerate(cells):
        separate = cell(tmp_path / "separate" / str(i), name, budget, protocol)
        run_shared_cell(model, tokenizer, task, separate, protocol)
        rows = finished_rows(tmp_path / "separate" / str(i) / name)
        assert len(rows) == 12
        assert [
            without(r, ("seconds",)) for r in finished_rows(tmp_path / "sweep" / str(i) / name)
        ] == [without(r, ("seconds",)) for r in rows]
        assert [r["turn"] for r in rows] == [1, 2, 3] * 4
        predictions.update(r["prediction"] for r in rows)
    assert len(predictions) > 1, "eviction must change some answers for the test to mean anything"


def test_turns_accumulate_as_one_conversation(gqa_model):
    model, tokenizer = gqa_model
    task = AskedTwice(NeedleTask(context_lengths=[300], depths=[50]))
    prepared = [(e, tokenize_prompt(tokenizer, e)) for e in task.examples(tokenizer, 10_000)]
    (group,) = context_groups(prepared)
    stops = stop_token_ids(model, tokenizer)
    cache = DynamicCache()
    with evict(model, Full()):
        last_logits = prefill(model, group.compressed_ids("shared_context"), cache)
        turns = answer_turns(model, tokenizer, cache, group, "shared_context", last_logits, True)
    # The whole conversation read at once by the full cache answers the last question alike.
    conversation = [group.questions[0][1].context_ids, group.questions[0][1].question_ids]
    for index in (1, 2):
        previous = turns[index - 1].tokens
        last = [] if previous[-1] in stops else previous[-1:]
        conversation += [
            torch.tensor([previous[:-1] + last]),
            followup_ids(tokenizer, group.questions[index][0]),
        ]
    ids = torch.cat(conversation, dim=1)
    fresh = DynamicCache()
    logits = prefill(model, ids, fresh)
    expected = greedy_generate(
        model,
        fresh,
        ids.shape[1],
        group.questions[2][0].max_new_tokens,
        stops,
        next_token_logits=logits,
    )
    assert turns[2].tokens == expected
    assert cache.get_seq_length() == ids.shape[1] + len(expected) - 1


def test_shards_deal_whole_contexts_and_together_give_the_unsharded_rows(tmp_path, gqa_model):
    model, tokenizer = gqa_model
    task = AskedTwice()
    budget = Budget(tokens=48)
    run_shared_cell(
        model, tokenizer, task, cell(tmp_path / "one", "snapkv", budget, "s"), "shared_context"
    )
    for index in (0, 1):
        shard = Shard(index, 2)
        run_shared_cell(
            model,
            tokenizer,
            task,
            cell(tmp_path / "two", "snapkv", budget, "s", shard),
            "shared_context",
        )
        rows = finished_rows(tmp_path / "two" / "snapkv")
        contexts = {row["context"] for row in rows}
        assert all(sum(r["context"] == c for r in rows) == 3 for c in contexts)
    whole = {
        row["example_id"]: without(row, ("seconds",))
        for row in finished_rows(tmp_path / "one" / "snapkv")
    }
    halves = {
        row["example_id"]: without(row, ("seconds",))
        for row in finished_rows(tmp_path / "two" / "snapkv")
    }
    assert whole == halves and len(whole) == 12


def test_an_interrupted_cell_resumes_the_questions_it_had_not_answered(tmp_path, gqa_model):
    model, tokenizer = gqa_model
    task = AskedTwice()
    budget = Budget(tokens=48)
    run_shared_cell(
        model, tokenizer, task, cell(tmp_path / "whole", "capkv", budget, "s"), "shared_context"
    )
    expected = finished_rows(tmp_path / "whole" / "capkv")
    folder = tmp_path / "cut" / "capkv"
    folder.mkdir(parents=True)
    lines = (tmp_path / "whole" / "capkv" / "examples.jsonl").read_text().splitlines(True)
    (folder / "examples.jsonl").write_text("".join(lines[:4]))  # killed inside the 2nd context
    run_shared_cell(
        model, tokenizer, task, cell(tmp_path / "cut", "capkv", budget, "s"), "shared_context"
    )
    resumed = finished_rows(folder)
    by_id = {row["example_id"]: without(row, ("seconds",)) for row in resumed}
    assert by_id == {row["example_id"]: without(row, ("seconds",)) for row in expected}


def test_run_py_sweeps_and_multiruns_answer_as_context_only_does(tmp_path):
    from tests.harness.test_run import run

    tiny = ["model=tiny-random", "task.context_lengths=[400]", "task.depths=[0,100]"]
    shared = [*tiny, "task.num_needles=2", "protocol=shared_context"]
    for way in ("sweep", "multirun", "alone"):
        (tmp_path / way).mkdir()
    run(tmp_path / "sweep", *shared, "methods=[capkv,snapkv,full]", "budgets=[64]")
    run(tmp_path / "multirun", "-m", *shared, "method=capkv,snapkv", "budget=64")
    alone = [*tiny, "task.num_needles=2", "protocol=context_only", "budgets=[64]"]
    run(tmp_path / "alone", *alone, "methods=[capkv,snapkv]")

    def rows(way: str, method: str, protocol: str) -> list[dict[str, Any]]:
        folder = tmp_path / way / "results" / "runs" / "tiny-random" / "needle" / method
        return finished_rows(folder / "budget64" / protocol)

    for method in ("capkv", "snapkv"):
        expected = [without(row) for row in rows("alone", method, "context_only")]
        assert len(expected) == 4
        for way in ("sweep", "multirun"):
            assert [without(row) for row in rows(way, method, "shared_context")] == expected, way
    assert (tmp_path / "sweep" / "results" / "turns.md").is_file()
