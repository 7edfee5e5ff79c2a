"""LongBench's official protocol, token for token.

The official ``config/dataset2prompt.json`` and ``dataset2maxlen.json`` are kept verbatim under
``tests/fixtures/longbench_official``; our settings must equal them character for character. The
prompt token ids the official ``pred.py`` would feed a model are rebuilt here from its documented
steps (not its code), and the ids our runner feeds (:func:`capkv.tasks.prompting.tokenize_prompt`)
must be the same for every fixture record of all 16 datasets, cut or not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from capkv.tasks.base import Example
from capkv.tasks.longbench import DATASETS, MAX_NEW_TOKENS, PROMPT_TEMPLATES, LongBench
from capkv.tasks.longbench.metrics import DATASET_METRIC, FIRST_LINE_DATASETS
from capkv.tasks.longbench.settings import E_DATASETS, SETTINGS
from capkv.tasks.prompting import render_parts, tokenize_prompt
from tests.conftest import train_bpe_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "longbench"
OFFICIAL = Path(__file__).resolve().parents[1] / "fixtures" / "longbench_official"
OFFICIAL_PROMPTS = json.loads((OFFICIAL / "dataset2prompt.json").read_text(encoding="utf-8"))
OFFICIAL_MAXLEN = json.loads((OFFICIAL / "dataset2maxlen.json").read_text(encoding="utf-8"))
# pred.py: "chat models are better off without build prompts on these tasks"
NO_CHAT = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
# eval.py: the datasets whose prediction is cut to its first line, and each English metric
FIRST_LINE = {"trec", "triviaqa", "samsum", "lsht"}
OFFICIAL_METRIC = {
    **dict.fromkeys(
        ["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique"],
        "qa_f1_score",
    ),
    **dict.fromkeys(["gov_report", "qmsum", "multi_news", "samsum"], "rouge_score"),
    "triviaqa": "qa_f1_score",
    "trec": "classification_score",
    "passage_retrieval_en": "retrieval_score",
    "passage_count": "count_score",
    "lcc": "code_sim_score",
    "repobench-p": "code_sim_score",
}
# pred.py --e
OFFICIAL_E = [
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec",
    "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
]  # fmt: skip
# A chat template like Llama 3's: it opens with the BOS itself.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}<|sep|>{{ m['content'] }}"
    "<|end|>{% endfor %}{% if add_generation_prompt %}<|start|>assistant<|sep|>{% endif %}"
)


def records(name: str) -> list[dict[str, Any]]:
    lines = (FIXTURES / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def official_prompt_ids(
    tokenizer: Any, dataset: str, record: dict[str, Any], max_length: int
) -> list[int]:
    """The prompt ids ``pred.py`` gives the model, from its documented steps.

    1. ``prompt_format.format(**record)`` with the dataset's official prompt;
    2. tokenised with ``tokenizer(prompt)`` (special tokens in); when longer than ``max_length``,
       the prompt becomes the decoded first ``int(max_length / 2)`` tokens followed by the decoded
       last ``int(max_length / 2)`` (``skip_special_tokens=True``);
    3. outside the six datasets that skip it, the chat prompt built around it (``build_chat``;
       for a model with a chat template, its user turn and assistant header, whose own BOS takes
       the place of the one ``tokenizer()`` adds);
    4. tokenised.
    """
    prompt = OFFICIAL_PROMPTS[dataset].format(**record)
    ids = tokenizer(prompt)["input_ids"]
    if len(ids) > max_length:
        half = int(max_length / 2)
        prompt = tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(
            ids[-half:], skip_special_tokens=True
        )
    if dataset in NO_CHAT:
        return tokenizer(prompt)["input_ids"]
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def bpe_with_bos() -> PreTrainedTokenizerFast:
    """A byte-level BPE of the fixtures that adds a BOS, with a chat template carrying it."""
    texts = [path.read_text(encoding="utf-8") for path in sorted(FIXTURES.glob("*.jsonl"))]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=800)
    tokenizer.add_special_tokens(
        {"bos_token": "<s>", "additional_special_tokens": ["<|start|>", "<|sep|>", "<|end|>"]}
    )
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    assert tokenizer("a")["input_ids"][0] == bos
    return tokenizer


@pytest.fixture(scope="module", params=["bpe-with-bos", "smollm2"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    if request.param == "bpe-with-bos":
        return bpe_with_bos()
    from capkv.models.smollm2 import _smollm2_tokenizer, smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
    return _smollm2_tokenizer(gguf, 49152)


def test_templates_and_lengths_are_the_official_strings() -> None:
    for name in DATASETS:
        assert PROMPT_TEMPLATES[name] == OFFICIAL_PROMPTS[name], name
        assert MAX_NEW_TOKENS[name] == OFFICIAL_MAXLEN[name], name
    assert "asconcisely" in PROMPT_TEMPLATES["narrativeqa"]  # the official typo, kept


def test_chat_rule_first_line_rule_metrics_and_e_datasets_are_the_official_ones() -> None:
    assert {name for name in DATASETS if not SETTINGS[name].chat_template} == NO_CHAT & set(
        DATASETS
    )
    assert FIRST_LINE_DATASETS == FIRST_LINE & set(DATASETS)
    assert {name: DATASET_METRIC[name].__name__ for name in DATASETS} == OFFICIAL_METRIC
    assert list(E_DATASETS) == OFFICIAL_E


def official_length(tokenizer: Any, dataset: str, record: dict[str, Any]) -> int:
    return len(tokenizer(OFFICIAL_PROMPTS[dataset].format(**record))["input_ids"])


@pytest.mark.parametrize("cut", ["none", "shallow", "deep"])
@pytest.mark.parametrize("dataset", DATASETS)
def test_prompt_ids_are_the_ones_pred_py_builds(tokenizer: Any, dataset: str, cut: str) -> None:
    # none: every prompt whole; shallow: 7 tokens under the shortest prompt; deep: an odd limit
    # of at most 61 tokens, under half the shortest prompt, that cuts into the question part of
    # most datasets
    rows = records(dataset)
    shortest = min(official_length(tokenizer, dataset, record) for record in rows)
    max_length = {"none": 10**6, "shallow": shortest - 7, "deep": min(61, shortest // 2) | 1}[cut]
    examples = list(LongBench([dataset], str(FIXTURES)).examples(tokenizer, max_length))
    assert len(examples) == len(rows)
    for example, record in zip(examples, rows, strict=True):
        ours = tokenize_prompt(tokenizer, example).full()[0].tolist()
        assert ours == official_prompt_ids(tokenizer, dataset, record, max_length)
        was_cut = official_length(tokenizer, dataset, record) > max_length
        assert was_cut == (cut != "none")


@pytest.mark.parametrize("dataset", ["qasper", "trec", "repobench-p"])
def test_longbench_e_prompts_are_built_the_same_way(tokenizer: Any, dataset: str) -> None:
    task = LongBench([dataset], str(FIXTURES), variant="e")
    rows = records(f"{dataset}_e")
    for example, record in zip(task.examples(tokenizer, 101), rows, strict=True):
        ours = tokenize_prompt(tokenizer, example).full()[0].tolist()
        assert ours == official_prompt_ids(tokenizer, dataset, record, 101)


@pytest.mark.parametrize("chat", [False, True])
def test_a_token_across_the_seam_is_the_whole_prompt_s_token(tokenizer: Any, chat: bool) -> None:
    # a seam inside a word (a middle cut can leave one there): read whole, "Paragraph" is one
    # pre-token and its tokens are not those of "Paragr" and "aph" apart
    example = Example(
        "seam", "See Paragr", "aph 12.\nQuestion: Who?", ["x"], 8, use_chat_template=chat
    )
    before, after = render_parts(tokenizer, example)
    whole = tokenizer(before + after, add_special_tokens=not chat)["input_ids"]
    apart = (
        tokenizer(before, add_special_tokens=not chat)["input_ids"]
        + tokenizer(after, add_special_tokens=False)["input_ids"]
    )
    prompt = tokenize_prompt(tokenizer, example)
    assert prompt.full()[0].tolist() == whole
    assert apart != whole  # the case the split by offsets is for
    assert prompt.context_ids[0].tolist() == whole[: prompt.context_ids.shape[1]]
    assert "Question: Who?" in tokenizer.decode(prompt.question_ids[0])
