"""RULER tasks: answerable examples that fill their length, RULER's scoring, seeds and the suite."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest
from transformers import PreTrainedTokenizerFast

from capkv.harness.runner import check_same_config, write_config
from capkv.results.store import stored_config
from capkv.tasks.base import Example
from capkv.tasks.ruler import (
    SUBTASKS,
    CommonWordsTask,
    FrequentWordsTask,
    NiahTask,
    RulerSuite,
    VariableTrackingTask,
    ruler_variant,
    string_match_all,
    variants,
)

LENGTH = 1024


@pytest.fixture(scope="module")
def tokenizer(essay_tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    return essay_tokenizer


def generate(task, tokenizer, max_prompt_tokens: int = 4096) -> list[Example]:
    return list(task.examples(tokenizer, max_prompt_tokens))


def sequence_tokens(tokenizer, example: Example) -> int:
    text = f"{example.context}{example.question} {example.answer_prefix}"
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + example.max_new_tokens


@pytest.mark.parametrize("subtask", SUBTASKS)
def test_examples_are_answerable_fill_their_length_and_score(tokenizer, subtask: str) -> None:
    task = ruler_variant(subtask, context_lengths=[LENGTH], num_examples=2)
    examples = generate(task, tokenizer)
    assert [e.example_id for e in examples] == [f"{subtask}_len1024_000", f"{subtask}_len1024_001"]
    for example in examples:
        assert example.metadata == {"subtask": subtask, "context_length": LENGTH}
        assert example.answers and all(answer in example.context for answer in example.answers)
        assert LENGTH - 16 <= sequence_tokens(tokenizer, example) <= LENGTH
        assert example.use_chat_template and example.question.startswith("\n")
        assert task.score(" " + ", ".join(example.answers).upper(), example) == {
            "string_match_all": 1.0
        }
        assert task.score(example.answers[0], example)["string_match_all"] == pytest.approx(
            1 / len(example.answers)
        )
    assert examples[0].context != examples[1].context


def test_string_match_all_is_case_insensitive_containment() -> None:
    assert string_match_all("Foo and BAR.", ["foo", "bar", "baz"]) == pytest.approx(2 / 3)
    assert string_match_all("nothing", ["foo"]) == 0.0


def test_examples_are_deterministic_per_seed(tokenizer) -> None:
    first = generate(NiahTask(context_lengths=[512], num_examples=1), tokenizer)
    again = generate(NiahTask(context_lengths=[512], num_examples=1), tokenizer)
    other = generate(NiahTask(context_lengths=[512], num_examples=1, seed=1), tokenizer)
    assert first == again
    assert first[0].answers != other[0].answers


def test_more_examples_extend_fewer_and_a_folder_of_fewer(tokenizer, tmp_path) -> None:
    # num_examples only counts examples (RulerSuite.EXTENT_SETTINGS): example i is the same
    # whatever it is, so a widened run extends a folder of fewer and keeps its rows.
    fewer = generate(RulerSuite(context_lengths=[LENGTH, 1536], num_examples=1), tokenizer)
    more = generate(RulerSuite(context_lengths=[LENGTH, 1536], num_examples=3), tokenizer)
    assert len(more) == 3 * len(fewer)
    assert fewer == [example for example in more if example.example_id.endswith("_000")]

    def config(**task: Any) -> dict[str, Any]:
        task = {"_target_": "capkv.tasks.ruler.RulerSuite", "num_examples": 1, **task}
        return {"model": {"name": "m"}, "method": {"name": "capkv"}, "task": task}

    write_config(tmp_path, config())
    check_same_config(tmp_path, config(num_examples=9))
    write_config(tmp_path, config(num_examples=9))
    write_config(tmp_path, config(num_examples=3))  # the folder still holds 9 per length
    assert stored_config(tmp_path)["task"]["num_examples"] == 9
    with pytest.raises(ValueError, match=r"other settings \(differs in task.seed\)"):
        check_same_config(tmp_path, config(num_examples=9, seed=1))
    needle = {"_target_": "capkv.tasks.needle.NeedleTask", "depths": [0]}
    write_config(tmp_path / "needle", {**config(), "task": needle})
    with pytest.raises(ValueError, match=r"differs in task.depths"):
        check_same_config(tmp_path / "needle", {**config(), "task": {**needle, "depths": [0, 50]}})


def needles_of(example: Example) -> list[tuple[str, str]]:
    return re.findall(r"One of the special magic numbers for (\S+) is: (\d{7})\.", example.context)


def test_niah_variants_hide_and_ask_as_ruler_does(tokenizer) -> None:
    kwargs = {"context_lengths": [LENGTH], "num_examples": 1}
    (single,) = generate(NiahTask(**kwargs), tokenizer)
    assert len(needles_of(single)) == 1
    assert single.question.startswith("\nWhat is the special magic number for ")
    assert single.answer_prefix.endswith("mentioned in the provided text is")

    (multikey,) = generate(ruler_variant("niah_multikey", **kwargs), tokenizer)
    needles = needles_of(multikey)
    assert len({key for key, _ in needles}) == 4 and len(multikey.answers) == 1
    asked = re.search(r"number for (\S+) mentioned", multikey.question).group(1)
    assert multikey.answers == [value for key, value in needles if key == asked]

    (multivalue,) = generate(ruler_variant("niah_multivalue", **kwargs), tokenizer)
    assert len(needles_of(multivalue)) == 4 and len({k for k, _ in needles_of(multivalue)}) == 1
    assert sorted(multivalue.answers) == sorted(v for _, v in needles_of(multivalue))
    assert multivalue.question.startswith("\nWhat are all the special magic numbers for ")

    (multiquery,) = generate(ruler_variant("niah_multiquery", **kwargs), tokenizer)
    keys = [key for key, _ in needles_of(multiquery)]
    assert len(keys) == 4 and len(multiquery.answers) == 4
    assert ", and " in multiquery.question and all(key in multiquery.question for key in keys)


def test_repeat_haystack_uses_ruler_noise(tokenizer) -> None:
    task = NiahTask(context_lengths=[LENGTH], num_examples=1, haystack="repeat")
    (example,) = generate(task, tokenizer)
    assert example.context.count("The grass is green.") > 10
    with pytest.raises(ValueError, match="haystack"):
        NiahTask(haystack="needles")


def test_variable_tracking_chain_is_in_order_after_a_solved_example(tokenizer) -> None:
    task = VariableTrackingTask(context_lengths=[LENGTH], num_examples=1, num_hops=3)
    (example,) = generate(task, tokenizer)
    first, *rest = example.answers
    assert len(example.answers) == 4
    value = re.search(rf"VAR {first} = (\d{{5}})", example.context).group(1)
    positions = [example.context.index(f"VAR {first} = {value}")]
    for before, after in zip(example.answers[:-1], rest, strict=True):
        positions.append(example.context.index(f"VAR {after} = VAR {before}"))
    assert positions == sorted(positions)
    assert f"assigned the value {value} in the text above" in example.question
    assert f"4 variables are assigned the value {value}, they are:" in example.answer_prefix
    assert example.context.count("Question: Find all variables") == 1  # the solved example


def list_counts(text: str) -> Counter[str]:
    return Counter(re.findall(r"\d+\. ([a-z]+)", text))


@pytest.mark.parametrize(("length", "freqs"), [(LENGTH, (6, 1)), (4200, (30, 3))])
def test_common_words_are_the_most_frequent_of_the_list(tokenizer, length, freqs) -> None:
    (example,) = generate(CommonWordsTask(context_lengths=[length], num_examples=1), tokenizer)
    demo, task_list = example.context.rsplit("Below is a numbered list of words.", 1)
    counts = list_counts(task_list)
    assert {word for word, _ in counts.most_common(10)} == set(example.answers)
    assert {counts[word] for word in example.answers} == {freqs[0]}
    assert min(counts.values()) == freqs[1]
    assert demo.count("Answer: The top 10 words") == 1


def test_frequent_words_follow_the_zipf_ranking(tokenizer) -> None:
    (example,) = generate(FrequentWordsTask(context_lengths=[LENGTH], num_examples=1), tokenizer)
    counts = Counter(example.context.split("coded words. ", 1)[1].split())
    ranked = [word for word, _ in counts.most_common(4)]
    assert ranked[0] == "..." and ranked[1:] == example.answers
    with pytest.raises(ValueError, match="alpha"):
        FrequentWordsTask(alpha=1.0)


def test_suite_covers_every_subtask_and_scores_each(tokenizer) -> None:
    suite = RulerSuite(context_lengths=[LENGTH], num_examples=1)
    examples = generate(suite, tokenizer)
    assert [e.metadata["subtask"] for e in examples] == list(SUBTASKS)
    assert sorted(SUBTASKS) == variants()  # every configured variant is in the suite
    assert len({e.example_id for e in examples}) == len(examples)
    for example in examples:
        assert suite.score(" ".join(example.answers), example) == {"string_match_all": 1.0}
    assert RulerSuite(subtasks=["vt"], haystack="repeat").tasks["vt"].haystack == "repeat"
    with pytest.raises(ValueError, match="unknown RULER subtasks"):
        RulerSuite(subtasks=["qa_1"])


def test_too_long_and_too_short_lengths_raise_clear_errors(tokenizer) -> None:
    too_long = NiahTask(context_lengths=[512, 2048], num_examples=1)
    with pytest.raises(ValueError, match=r"context length 2048.*limit of 1000.*context_lengths"):
        next(too_long.examples(tokenizer, max_prompt_tokens=1000))
    too_short = NiahTask(context_lengths=[150], num_examples=1)
    with pytest.raises(ValueError) as raised:
        next(too_short.examples(tokenizer, max_prompt_tokens=1000))
    # The fixed parts are counted, so the user knows the shortest length that holds them.
    match = re.fullmatch(
        r"context length 150 cannot hold RULER niah_single's fixed parts: its intro, needles or "
        r"items, question and answer prefix take (\d+) tokens and the answer max_new_tokens=128 "
        r"more; pass task.context_lengths=\[\.\.\.\] of at least about (\d+)\.",
        str(raised.value),
    )
    assert match, str(raised.value)
    fixed, least = (int(group) for group in match.groups())
    assert least == fixed + 128 + 1 > 150
    assert next(NiahTask(context_lengths=[least + 20], num_examples=1).examples(tokenizer, 1000))
