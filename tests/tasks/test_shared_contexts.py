"""Several questions per context (issue 28): the needle's k needles, RULER's niah questions,
LongBench's shared records, the shares_contexts() protocol, and byte-identity with one question.

The digests are those of the examples the code before issue 28 (commit 1467a83) yields with the
tests' essay tokenizer; a new ``tokenizers`` release that trains that BPE differently changes
them too: recompute them then with 1467a83's ``capkv`` and :func:`digest`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from capkv.tasks.base import SHARED_CONTEXT_TASKS, CappedTask, Example, shares_contexts
from capkv.tasks.longbench import CustomJsonlTask, LongBench
from capkv.tasks.needle import NeedleTask
from capkv.tasks.perplexity import PerplexityTask
from capkv.tasks.prompting import tokenize_prompt
from capkv.tasks.ruler import RulerSuite, ruler_variant

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "longbench"
NEEDLE_DIGEST = "62ac96c55be5ebd01b1810c07c0cc81e39ab661f2ac3ca03a665bdb8305657b1"
RULER_DIGESTS = {
    "niah_single": "450d0fb395bc4582a6c6c7877d7320150e37d34474a6ae6821fc508f397efa21",
    "niah_multikey": "789ffbf3e7e92a4aa78044612f847796a6f7819a81088a4fb6c85acbf8877890",
    "niah_multivalue": "4959a68fe0bdb77dbe89a6d6461bc47ceddc3c33899818525810bf0f3371edb7",
    "niah_multiquery": "089f752e6b00b30099f7dd3301f9aaa50b976a2de03e63c7af81dd4b45a5c543",
    "vt": "2e3b0f4b7f979a38a53e93063e8c311c90340e066fad48600a456c4d2fd35e06",
    "cwe": "9f414519ce25927d12d73da75029ca61335f7b9a51c8cb5d850654bbce4d0b43",
    "fwe": "80f62e17571d7b0d39cd7ba8666fe5739c90f29b0412a9dcd9222f9d74d1006a",
}
NEEDLE_SENTENCE = re.compile(r"One of the special magic numbers for (\S+) is: (\d+)\.")


@pytest.fixture(scope="module")
def tokenizer(essay_tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    return essay_tokenizer


def digest(examples: list[Example]) -> str:
    """sha256 of every field of the examples, in order."""
    text = json.dumps([asdict(example) for example in examples], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def count(tokenizer: PreTrainedTokenizerFast, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def groups(examples: list[Example]) -> list[list[Example]]:
    """Runs of consecutive examples with the identical context."""
    runs: list[list[Example]] = []
    for example in examples:
        if runs and runs[-1][0].context == example.context:
            runs[-1].append(example)
        else:
            runs.append([example])
    return runs


# --- one question per context: byte-identical with the code before issue 28 ---


def test_one_needle_is_byte_identical_to_before(tokenizer) -> None:
    task = NeedleTask(context_lengths=[1024, 2048, 4096], depths=[0, 25, 50, 75, 100])
    assert task.num_needles == 1 and not task.shares_contexts()
    assert digest(list(task.examples(tokenizer, 10**6))) == NEEDLE_DIGEST


def test_one_ruler_question_is_byte_identical_to_before(tokenizer) -> None:
    suite = RulerSuite()  # conf/task/ruler.yaml's defaults: 7 subtasks, 20 of 4096 tokens
    assert suite.num_questions == 1 and not suite.shares_contexts()
    by_subtask: dict[str, list[Example]] = {}
    for example in suite.examples(tokenizer, 10**6):
        by_subtask.setdefault(example.metadata["subtask"], []).append(example)
    assert {name: digest(examples) for name, examples in by_subtask.items()} == RULER_DIGESTS


# --- the needle with k needles ---


def test_k_needles_share_one_context_each_asked_once_in_a_shuffled_order(tokenizer) -> None:
    k, lengths, depths = 4, [1024, 2048], [0.0, 25.0, 50.0, 100.0]
    task = NeedleTask(context_lengths=lengths, depths=depths, num_needles=k)
    assert task.shares_contexts()
    examples = list(task.examples(tokenizer, 10**6))
    cells = groups(examples)
    assert len(cells) == len(lengths) * len(depths) and all(len(cell) == k for cell in cells)
    assert len({cell[0].context for cell in cells}) == len(cells)
    orders = []
    for cell, (length, depth) in zip(cells, [(L, d) for L in lengths for d in depths], strict=True):
        context = cell[0].context
        hidden = dict(NEEDLE_SENTENCE.findall(context))
        assert len(hidden) == k and len(set(hidden.values())) == k  # distinct keys and values
        order = [example.metadata["needle_index"] for example in cell]
        assert sorted(order) == list(range(k)) and order == task.asking_order(length, depth)
        orders.append(order)
        essays = context.split("\n", 1)[1]
        assert abs(count(tokenizer, essays) - length) <= 3 * k
        for example in cell:
            j = example.metadata["needle_index"]
            key = re.search(r"number for (\S+) mentioned", example.question).group(1)
            value = example.answers[0]
            assert hidden[key] == value
            assert context.count(f"One of the special magic numbers for {key} is: {value}.") == 1
            assert example.example_id == f"len{length}_depth{depth:g}_key{j}"
            assert example.metadata == {
                "context_length": length,
                "depth": depth if j == 0 else (depth + j * 100 / k) % 100,
                "needle_value": value,
                "context_depth": depth,
                "num_needles": k,
                "needle_index": j,
            }
            assert example.answer_prefix.endswith(f"for {key} mentioned in the provided text is")
            assert task.score(f" {value}.", example) == {"exact": 1.0, "graded": 1.0}
    assert any(order != sorted(order) for order in orders)  # shuffled, not the depth order
    assert len({tuple(order) for order in orders}) > 1
    again = list(
        NeedleTask(context_lengths=lengths, depths=depths, num_needles=k).examples(tokenizer, 10**6)
    )
    assert digest(again) == digest(examples)


def test_needles_sit_at_their_depths_in_index_order(tokenizer) -> None:
    task = NeedleTask(context_lengths=[2048], depths=[50.0], num_needles=4)
    assert task.needle_depths(50.0) == [50.0, 75.0, 0.0, 25.0]
    assert task.needle_depths(100.0) == [100.0, 25.0, 50.0, 75.0]
    cell = task.cell(tokenizer, 2048, 50.0)
    context = cell[0].context
    by_index = {e.metadata["needle_index"]: e.answers[0] for e in cell}
    # by depth: 0 (needle 2), 25 (3), 50 (0), 75 (1)
    positions = [context.index(by_index[j]) for j in (2, 3, 0, 1)]
    assert positions == sorted(positions)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_needles": 0}, r"task\.num_needles=0 is not a number of needles of at least 1; "),
        ({"num_needles": 2.5}, r"task\.num_needles=2\.5 is not a number of needles"),
        ({"num_needles": True}, r"task\.num_needles=True is not a number of needles"),
        ({"num_needles": 2000}, r"task\.num_needles=2000 exceeds the 1600 distinct keys"),
        (
            {"num_needles": 3, "needle_kind": "san_francisco"},
            r"task\.num_needles=3 needs needles with distinct keys, but needle_kind=san_francisco "
            r"hides one fixed needle; pass task\.needle_kind=magic_number or task\.num_needles=1\.",
        ),
        (
            {"num_needles": 3, "needle": "The code is {value}."},
            r"task\.needle='The code is \{value\}\.' has no \{key\}, so its 3 needles could not "
            r"be told apart; put \{key\} in task\.needle or pass task\.num_needles=1\.",
        ),
        (
            {"num_needles": 3, "question": "What is the code?"},
            r"task\.question='What is the code\?' has no \{key\}",
        ),
    ],
)
def test_bad_needle_counts_are_refused_in_one_line(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        NeedleTask(**settings)
    assert "\n" not in str(raised.value)


def test_needles_that_fill_the_context_are_refused_before_any_example(tokenizer) -> None:
    task = NeedleTask(context_lengths=[2048, 256], depths=[50.0], num_needles=12)
    examples = task.examples(tokenizer, 10**6)
    with pytest.raises(ValueError) as raised:
        next(examples)
    text = str(raised.value)
    assert re.fullmatch(
        r"context length 256 cannot hold the needle task's fixed parts: its intro and 12 needles "
        r"take \d+ tokens of the context \(the question, answer prefix and chat template \d+ more "
        r"of the prompt\); pass task\.context_lengths=\[\.\.\.\] of at least \d+ tokens \(or "
        r"fewer task\.num_needles\)\.",
        text,
    ), text


# --- RULER's niah with several questions ---


@pytest.mark.parametrize(
    ("subtask", "keys"),
    [("niah_multikey", 4), ("niah_multiquery", 8), ("niah_multivalue", 2), ("niah_single", 2)],
)
def test_niah_asks_each_context_new_keys(tokenizer, subtask: str, keys: int) -> None:
    n = 4 if subtask == "niah_multikey" else 2
    task = ruler_variant(subtask, context_lengths=[1024], num_examples=2, num_questions=n)
    assert task.shares_contexts() and task.hidden_keys() == keys
    examples = list(task.examples(tokenizer, 10**6))
    contexts = groups(examples)
    assert [len(group) for group in contexts] == [n, n]
    for index, group in enumerate(contexts):
        context = group[0].context
        hidden = NEEDLE_SENTENCE.findall(context)
        assert len({key for key, _ in hidden}) == keys
        asked = [re.search(r"for (.+) mentioned", e.question).group(1) for e in group]
        asked_keys = [key for query in asked for key in re.split(r", and |, ", query)]
        assert len(asked_keys) == len(set(asked_keys)) == n * task.num_queries
        for j, example in enumerate(group):
            assert example.example_id == f"{subtask}_len1024_{index:03d}_q{j}"
            assert example.metadata == {
                "subtask": subtask,
                "context_length": 1024,
                "num_questions": n,
                "question_index": j,
            }
            assert all(context.count(f"is: {answer}.") == 1 for answer in example.answers)
            assert len(example.answers) == task.num_queries * task.num_values
        longest = max(count(tokenizer, f"{e.context}{e.question} {e.answer_prefix}") for e in group)
        assert 1024 - 32 <= longest + task.max_new_tokens <= 1024


def test_the_suite_passes_num_questions_and_refuses_subtasks_without_it(tokenizer) -> None:
    suite = RulerSuite(subtasks=["niah_single", "niah_multikey"], num_questions=2)
    assert suite.shares_contexts() and shares_contexts(suite)
    assert {task.num_questions for task in suite.tasks.values()} == {2}
    assert RulerSuite(subtasks=["vt"]).tasks["vt"]  # 1 is passed to nothing, refused by nothing
    with pytest.raises(ValueError) as raised:
        RulerSuite(subtasks=["niah_single", "vt", "cwe"], num_questions=3)
    assert str(raised.value) == (
        "task.num_questions=3 asks a context several questions, which only RULER's "
        "niah_multikey, niah_multiquery, niah_multivalue, niah_single can; drop vt, cwe from "
        "task.subtasks or pass task.num_questions=1."
    )


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_bad_num_questions_are_refused_in_one_line(bad) -> None:
    message = rf"task\.num_questions={re.escape(repr(bad))} is not a number of questions of at"
    for build in (
        lambda: RulerSuite(num_questions=bad),
        lambda: ruler_variant("niah_multikey", num_questions=bad),
    ):
        with pytest.raises(ValueError, match=message):
            build()


def test_more_needles_than_ruler_depths_are_refused() -> None:
    with pytest.raises(ValueError, match=r"would hide 44 needles .* at 40 distinct depths; pass"):
        ruler_variant("niah_multivalue", num_questions=11)


# --- LongBench records sharing a context, and the protocol ---


def test_longbench_records_with_one_context_give_identical_context_ids(tokenizer) -> None:
    task = LongBench(["qasper"], str(FIXTURES), variant="e")
    examples = list(task.examples(tokenizer, 10**6))
    first, _, third = examples  # qasper_e.jsonl repeats its first record's context third
    assert first.context == third.context and first.example_id != third.example_id
    assert examples[1].context != first.context  # split by another record: the runner groups
    ids = [tokenize_prompt(tokenizer, example).context_ids for example in (first, third)]
    assert ids[0].tolist() == ids[1].tolist()
    assert task.shares_contexts()


def test_custom_file_records_sharing_a_context_stay_identical(tokenizer, tmp_path: Path) -> None:
    story = "Once upon a time a fox lived by the river. It fished every morning."
    lines = [
        {"input": "Where did the fox live?", "context": story, "answers": ["by the river"]},
        {"input": "When did it fish?", "context": story, "answers": ["every morning"]},
    ]
    path = tmp_path / "stories.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    task = CustomJsonlTask(str(path), "qa_f1_score", "{context}\n\nQuestion: {input}", 16)
    first, second = task.examples(tokenizer, 10**6)
    assert first.context == second.context and first.question != second.question
    assert tokenize_prompt(tokenizer, first).context_ids.tolist() == (
        tokenize_prompt(tokenizer, second).context_ids.tolist()
    )
    assert task.shares_contexts()


def test_shares_contexts_helper_capped_tasks_and_listing() -> None:
    class Bare:
        name = "bare"

    assert shares_contexts(Bare()) is False
    assert shares_contexts(PerplexityTask()) is False
    assert shares_contexts(NeedleTask(num_needles=2)) is True
    assert shares_contexts(NeedleTask()) is False
    assert CappedTask(NeedleTask(num_needles=2), 3).shares_contexts() is True
    assert CappedTask(Bare(), 3).shares_contexts() is False  # type: ignore[arg-type]
    for name in ("num_needles", "num_questions", "longbench", "custom"):
        assert name in SHARED_CONTEXT_TASKS
    assert "\n" not in SHARED_CONTEXT_TASKS
