"""LongBench task: fixtures, prompt split, per-dataset rules, middle truncation and errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hydra.utils import instantiate
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from capkv.tasks.base import Example
from capkv.tasks.longbench import (
    DATASETS,
    PROMPT_FORMATS,
    PROMPT_TEMPLATES,
    CustomJsonlTask,
    LongBench,
    PromptFormat,
    read_jsonl,
    truncate_middle,
)
from capkv.tasks.longbench.buckets import BucketScore, bucket_scores
from capkv.tasks.longbench.settings import E_DATASETS, length_bucket
from tests.conftest import train_bpe_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "longbench"
BIG_BUDGET = 1_000_000

# From THUDM/LongBench config/dataset2maxlen.json.
EXPECTED_MAX_NEW_TOKENS = {
    "narrativeqa": 128,
    "qasper": 128,
    "samsum": 128,
    "multifieldqa_en": 64,
    "trec": 64,
    "lcc": 64,
    "repobench-p": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "triviaqa": 32,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
}
NO_CHAT = {"trec", "triviaqa", "samsum", "lcc", "repobench-p"}

# The official question parts of a few templates, written out to guard against edits.
EXPECTED_QUESTION_TEMPLATE = {
    "narrativeqa": "\n\nNow, answer the question based on the story asconcisely as you can, "
    "using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}"
    "\n\nAnswer:",
    "gov_report": "\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "trec": "\n{input}",
    "lcc": "Next line of code:\n",
    "repobench-p": "{input}Next line of code:\n",
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (no merges): token counts are byte counts, decoding is exact."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


@pytest.fixture(scope="module")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained on the fixtures, so tokens span several characters."""
    texts = [path.read_text(encoding="utf-8") for path in sorted(FIXTURES.glob("*.jsonl"))]
    return train_bpe_tokenizer(texts, vocab_size=600)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


def records(dataset: str) -> list[dict[str, Any]]:
    lines = (FIXTURES / f"{dataset}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def all_examples(tokenizer: Any, budget: int = BIG_BUDGET, **kwargs: Any) -> list[Example]:
    return list(LongBench(data_dir=str(FIXTURES), **kwargs).examples(tokenizer, budget))


def test_fixtures_cover_every_dataset_in_the_official_schema() -> None:
    fields = {"input", "context", "answers", "length", "dataset", "language", "all_classes", "_id"}
    for dataset in DATASETS:
        rows = records(dataset)
        assert 2 <= len(rows) <= 3
        for row in rows:
            assert set(row) == fields
            assert row["dataset"] == dataset and isinstance(row["answers"], list)


def test_loads_every_fixture_with_ids_and_metadata(tokenizer: Any) -> None:
    examples = all_examples(tokenizer)
    expected = [(name, row) for name in DATASETS for row in records(name)]
    assert len(examples) == len(expected)
    for example, (name, row) in zip(examples, expected, strict=True):
        assert example.example_id == f"{name}/{row['_id']}"
        assert example.answers == row["answers"]
        assert example.metadata == {
            "subtask": name,
            "all_classes": row["all_classes"],
            "length": row["length"],
        }
    assert len({example.example_id for example in examples}) == len(examples)


def test_context_plus_question_is_the_official_prompt(tokenizer: Any) -> None:
    examples = iter(all_examples(tokenizer))
    for name in DATASETS:
        for row in records(name):
            example = next(examples)
            prompt = PROMPT_TEMPLATES[name].format(context=row["context"], input=row["input"])
            assert example.context + example.question == prompt
            assert example.context.endswith(row["context"])
            assert row["input"] in example.question


@pytest.mark.parametrize("dataset", sorted(EXPECTED_QUESTION_TEMPLATE))
def test_question_part_follows_the_context(dataset: str) -> None:
    template = PROMPT_TEMPLATES[dataset]
    context_part, question_part = PROMPT_FORMATS[dataset].parts("{context}", "{input}")
    assert question_part == EXPECTED_QUESTION_TEMPLATE[dataset]
    assert context_part + question_part == template


@pytest.mark.parametrize("dataset", DATASETS)
def test_generation_length_and_chat_template_rule(tokenizer: Any, dataset: str) -> None:
    examples = all_examples(tokenizer, datasets=[dataset])
    assert {example.max_new_tokens for example in examples} == {EXPECTED_MAX_NEW_TOKENS[dataset]}
    assert {example.use_chat_template for example in examples} == {dataset not in NO_CHAT}


def test_max_examples_and_single_dataset_string(tokenizer: Any) -> None:
    assert len(all_examples(tokenizer, max_examples=1)) == 16
    task = LongBench(datasets="trec", data_dir=str(FIXTURES))  # type: ignore[arg-type]
    assert task.datasets == ["trec"]


def test_hydra_instantiates_the_task() -> None:
    config = {
        "_target_": "capkv.tasks.longbench.LongBench",
        "datasets": ["trec", "lcc"],
        "data_dir": str(FIXTURES),
        "max_examples": 1,
    }
    task = instantiate(config)
    assert isinstance(task, LongBench) and task.datasets == ["trec", "lcc"]


def test_short_prompts_are_left_whole(tokenizer: Any) -> None:
    row = records("hotpotqa")[0]
    fmt = PROMPT_FORMATS["hotpotqa"]
    prompt = "".join(fmt.parts(row["context"], row["input"]))
    assert truncate_middle(tokenizer, prompt, len(prompt.encode())) == ("", prompt)


def test_middle_truncation_keeps_half_the_limit_at_each_end(tokenizer: Any) -> None:
    # byte tokenizer: tokens = bytes, so pred.py keeps int(limit / 2) bytes from each end
    row = records("narrativeqa")[0]
    fmt = PROMPT_FORMATS["narrativeqa"]
    prompt = "".join(fmt.parts(row["context"], row["input"]))
    limit = len(prompt) - 41
    assert truncate_middle(tokenizer, prompt, limit) == (
        prompt[: limit // 2],
        prompt[len(prompt) - limit // 2 :],
    )
    example = next(LongBench(["narrativeqa"], str(FIXTURES)).examples(tokenizer, limit))
    assert example.context + example.question == prompt[: limit // 2] + prompt[-(limit // 2) :]
    assert example.question == fmt.parts("", row["input"])[1]


@pytest.mark.parametrize("dataset", DATASETS)
def test_truncated_prompts_fit_a_multi_character_tokenizer(
    bpe_tokenizer: PreTrainedTokenizerFast, dataset: str
) -> None:
    # limit: the longest prompt with an empty context plus 15 tokens, so every context is cut
    tokenizer = bpe_tokenizer
    fmt = PROMPT_FORMATS[dataset]

    def count(text: str) -> int:
        return len(tokenizer(text)["input_ids"])

    limit = 15 + max(count("".join(fmt.parts("", row["input"]))) for row in records(dataset))
    examples = all_examples(tokenizer, limit, datasets=[dataset])
    for example, row in zip(examples, records(dataset), strict=True):
        prompt = example.context + example.question
        assert count(prompt) <= limit
        full = "".join(fmt.parts(row["context"], row["input"]))
        assert len(prompt) < len(full)


def test_a_question_longer_than_half_the_limit_is_cut_like_the_rest(tokenizer: Any) -> None:
    # pred.py cuts the whole prompt: the kept end is then the question part
    row = records("qasper")[0]
    fmt = PROMPT_FORMATS["qasper"]
    prompt = "".join(fmt.parts(row["context"], row["input"]))
    limit = 300  # the question part alone is longer than 150 bytes
    (example,) = all_examples(tokenizer, limit, datasets=["qasper"], max_examples=1)
    assert example.context == prompt[:150] and example.question == prompt[-150:]


def test_a_limit_of_one_token_is_rejected(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="too small to keep the ends"):
        all_examples(tokenizer, budget=1, datasets=["qasper"])


def test_score_uses_the_official_metric(tokenizer: Any) -> None:
    task = LongBench(["trec", "narrativeqa"], str(FIXTURES), max_examples=1)
    trec, narrativeqa = list(task.examples(tokenizer, BIG_BUDGET))
    # trec: first line "City" only -> one right match -> 1
    assert task.score("City\nCountry", trec) == {"score": 1.0}
    # narrativeqa, answers "Because an automatic lamp replaces the keeper." and "The lighthouse is
    # automated.": tokens [lighthouse, automated] vs [lighthouse, is, automated]: P = 1,
    # R = 2/3, F1 = 0.8 for the second answer (overlap 0 with the first); max = 0.8
    assert task.score("The lighthouse, automated", narrativeqa)["score"] == pytest.approx(0.8)


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"Unknown LongBench dataset.*'lsht'.*narrativeqa"):
        LongBench(datasets=["lsht"], data_dir=str(FIXTURES))


def test_missing_data_dir_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a folder"):
        LongBench(data_dir=str(tmp_path / "nowhere"))


def test_data_dir_without_the_jsonl_file_names_it(tmp_path: Path) -> None:
    (tmp_path / "trec.jsonl").write_text((FIXTURES / "trec.jsonl").read_text())
    LongBench(datasets=["trec"], data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=rf"qasper\.jsonl was not found in data_dir '{tmp_path}"):
        LongBench(datasets=["trec", "qasper"], data_dir=str(tmp_path))


def test_max_length_cuts_prompts_below_the_model_limit(tokenizer: Any) -> None:
    row = records("narrativeqa")[0]
    prompt = PROMPT_TEMPLATES["narrativeqa"].format(**row)
    limit = len(prompt) - 41
    task = LongBench(["narrativeqa"], str(FIXTURES), max_length=limit, max_examples=1)
    (short,) = task.examples(tokenizer, BIG_BUDGET)
    (same,) = task.examples(tokenizer, limit + 1000)  # the smaller limit wins
    (model,) = LongBench(["narrativeqa"], str(FIXTURES), max_examples=1).examples(tokenizer, limit)
    assert short.context + short.question == prompt[: limit // 2] + prompt[-(limit // 2) :]
    assert short == same == model


@pytest.mark.parametrize("bad", [0, 1, 2.5, True, "8k"])
def test_a_bad_max_length_is_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"task\.max_length=.* is not a number of tokens"):
        LongBench(data_dir=str(FIXTURES), max_length=bad)


def test_non_positive_max_examples_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_examples"):
        LongBench(data_dir=str(FIXTURES), max_examples=0)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return path


CUSTOM_ROWS = [
    {
        "input": "Who wrote it?",
        "context": "The memo {draft} was written by Ann.",
        "answers": ["Ann"],
    },
    {"_id": "b2", "input": "When?", "context": "It was sent in May.", "answers": ["May", "in May"]},
]


def test_custom_jsonl_task_builds_and_scores(tokenizer: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "memos.jsonl", CUSTOM_ROWS)
    task = CustomJsonlTask(
        path=str(path),
        metric="qa_f1_score",
        template="Doc: {context}\nQ: {input}\nA:",
        max_new_tokens=16,
        use_chat_template=False,
        name="memos",
    )
    first, second = list(task.examples(tokenizer, BIG_BUDGET))
    # braces inside the data are kept as they are
    assert first.context == "Doc: The memo {draft} was written by Ann."
    assert first.question == "\nQ: Who wrote it?\nA:"
    assert (first.example_id, second.example_id) == ("memos/0", "memos/b2")
    assert (first.max_new_tokens, first.use_chat_template) == (16, False)
    assert first.metadata == {"subtask": "memos", "all_classes": None, "length": None}
    assert task.score("Ann", first) == {"score": 1.0}
    # "may\nit was" -> tokens [may, it, was] vs "in may" -> [in, may]: P = 1/3, R = 1/2, F1 = 0.4;
    # vs "may": P = 1/3, R = 1, F1 = 0.5; max = 0.5
    assert task.score("May\nit was", second)["score"] == pytest.approx(0.5)


def test_custom_classification_with_first_line_only(tokenizer: Any, tmp_path: Path) -> None:
    rows = [{"input": "Q: Rome?", "context": "Q: Oslo?\nCity", "answers": ["City"]}]
    rows[0]["all_classes"] = ["City", "Country"]
    task = CustomJsonlTask(
        path=str(write_jsonl(tmp_path / "types.jsonl", rows)),
        metric="classification_score",
        template="{context}\n{input}",
        max_new_tokens=8,
        first_line_only=True,
    )
    (example,) = task.examples(tokenizer, BIG_BUDGET)
    # first line "City": one match, right -> 1 (the whole text would give 1/2)
    assert task.score("City\nCountry", example) == {"score": 1.0}


def test_custom_input_before_context_stays_in_the_context_part() -> None:
    fmt = PromptFormat("Q: {input}\nDoc: {context}\nA:", 8, True)
    assert fmt.parts("text", "why?") == ("Q: why?\nDoc: text", "\nA:")


def test_custom_unknown_metric_lists_valid_ones(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", CUSTOM_ROWS)
    with pytest.raises(ValueError, match=r"Unknown metric 'bleu'.*qa_f1_score.*code_sim_score"):
        CustomJsonlTask(str(path), "bleu", "{context}{input}", 8)


def test_custom_template_needs_one_context(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", CUSTOM_ROWS)
    with pytest.raises(ValueError, match="exactly once"):
        CustomJsonlTask(str(path), "qa_f1_score", "Q: {input}", 8)


def test_custom_missing_file_and_fields(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        CustomJsonlTask(str(tmp_path / "none.jsonl"), "qa_f1_score", "{context}", 8)
    path = write_jsonl(tmp_path / "bad.jsonl", [{"context": "c", "answers": ["a"]}])
    with pytest.raises(ValueError, match=r"line 1 of .*bad\.jsonl lacks the field 'input'"):
        CustomJsonlTask(str(path), "qa_f1_score", "{context}", 8)


GOOD = {"input": "Who?", "context": "Ann wrote it.", "answers": ["Ann"]}


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        (b'["a", "list"]', "holds a JSON list, not an object"),
        (b'"text"', "holds a JSON string, not an object"),
        (b'{"input": "Who?", "context": ', "is not valid JSON"),
        (b"\xff\xfe{}", "is not UTF-8 text"),
        (json.dumps({"input": "Who?", "answers": ["Ann"]}).encode(), "lacks the field 'context'"),
        (json.dumps({**GOOD, "answers": None}).encode(), "field 'answers' holds null"),
        (json.dumps({**GOOD, "answers": "Ann"}).encode(), "field 'answers' holds \"Ann\""),
        (json.dumps({**GOOD, "answers": []}).encode(), "field 'answers' is empty"),
        (json.dumps({**GOOD, "answers": ["Ann", 3]}).encode(), "'answers' must be a list of str"),
        (json.dumps({**GOOD, "context": 3}).encode(), "field 'context' holds 3, not a string"),
        (json.dumps({**GOOD, "all_classes": "a"}).encode(), "field 'all_classes' holds \"a\""),
    ],
)
def test_a_bad_record_is_refused_with_file_line_and_field(tmp_path, bad_line, message):
    path = tmp_path / "data.jsonl"
    good = json.dumps(GOOD).encode()
    path.write_bytes(good + b"\n\n" + bad_line + b"\n" + good + b"\n")  # line 3, after a blank
    with pytest.raises(ValueError, match="line 3 of " + str(path).replace(".", r"\.")) as error:
        CustomJsonlTask(str(path), "qa_f1_score", "{context}\n{input}", 8)
    assert message in str(error.value)
    assert len(list(read_jsonl(path, limit=1))) == 1  # the lines before it are readable


def test_longbench_e_reads_the_e_files_with_their_length_buckets(tokenizer: Any) -> None:
    task = LongBench(["trec", "lcc"], str(FIXTURES), variant="e")
    assert task.name == "longbench_e"
    examples = list(task.examples(tokenizer, BIG_BUDGET))
    rows = records("trec_e") + records("lcc_e")
    assert [e.example_id for e in examples] == [
        f"{name}/{row['_id']}" for name, row in zip(["trec"] * 3 + ["lcc"] * 3, rows, strict=True)
    ]
    assert [e.metadata["length_bucket"] for e in examples] == ["0-4k", "4-8k", "8k+"] * 2
    assert [e.metadata["subtask"] for e in examples] == ["trec"] * 3 + ["lcc"] * 3
    assert LongBench.reporting({"variant": "e"}).benchmark == "longbench_e"
    assert list(LongBench.reporting({"variant": "e"}).families) == list(E_DATASETS)


@pytest.mark.parametrize(
    ("length", "bucket"),
    [(0, "0-4k"), (3999, "0-4k"), (4000, "4-8k"), (7999, "4-8k"), (8000, "8k+"), (10**6, "8k+")],
)
def test_length_buckets_are_eval_py_s(length: int, bucket: str) -> None:
    assert length_bucket(length) == bucket


def test_a_longbench_e_record_without_length_is_named(tmp_path: Path) -> None:
    row = records("trec_e")[0]
    write_jsonl(tmp_path / "trec_e.jsonl", [row, {**row, "length": None}])
    with pytest.raises(ValueError, match=r"record 1 of .*trec_e\.jsonl has length=None"):
        LongBench(["trec"], str(tmp_path), variant="e")  # refused before any model loads


def test_bucket_scores_average_each_dataset_then_the_datasets() -> None:
    def row(subtask: str, bucket: str | None, score: float) -> dict[str, Any]:
        return {
            "subtask": subtask,
            "scores": {"score": score},
            "metadata": {"length_bucket": bucket},
        }

    rows = [
        row("lcc", "0-4k", 1.0),
        row("trec", "8k+", 0.5),
        row("trec", "0-4k", 0.0),
        row("trec", "0-4k", 1.0),
        row("lcc", None, 1.0),  # no bucket: not a LongBench-E row
    ]
    assert bucket_scores(rows) == [
        BucketScore("trec", "0-4k", 50.0, 2),
        BucketScore("trec", "8k+", 50.0, 1),
        BucketScore("lcc", "0-4k", 100.0, 1),
        BucketScore("average", "0-4k", 75.0, 3),  # (50 + 100) / 2: each dataset counts once
        BucketScore("average", "8k+", 50.0, 1),
    ]
