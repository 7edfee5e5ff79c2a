"""LongBench, the 16 English and code datasets (Bai et al. 2023, arXiv 2308.14508).

Prompts, generation lengths, the chat-template rule, middle truncation and scoring follow the
official THUDM/LongBench code (``config/dataset2prompt.json``, ``config/dataset2maxlen.json``,
``pred.py``, ``eval.py``). Each official template is split after ``{context}``: the part up to and
including the context becomes :attr:`Example.context`, the rest (instructions that follow the
context, ``{input}``, "Answer:") becomes :attr:`Example.question`, so that ``context + question``
is exactly the official prompt.

Differences from ``pred.py``: it cuts the middle out of the whole tokenised prompt; we cut the
middle out of the context only, so that the instructions and the question are never cut, and we
count the tokens of the prompt text without special tokens or chat template (leave room for those
in ``max_prompt_tokens``).
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from capkv.metrics import METRICS, best_score, first_line, score_prediction
from capkv.tasks.base import Example

HUB_DATASET = "THUDM/LongBench"
_PLACEHOLDER = re.compile(r"\{(context|input)\}")
_REQUIRED_FIELDS = ("input", "context", "answers")

# Verbatim from config/dataset2prompt.json. None of the English templates puts {input} before
# {context}. Templates without {input} (gov_report, multi_news, passage_count, lcc) get a question
# part made only of the closing instruction. In repobench-p, {input} is the in-file code prefix
# that directly follows the cross-file context: it goes to the question part, so the
# context_only protocol leaves it uncompressed.
PROMPT_TEMPLATES: dict[str, str] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. "
        "Answer the question as concisely as you can, using a single phrase if possible. "
        "Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based "
        "on the story as concisely as you can, using a single phrase if possible. Do not provide "
        "any explanation.\n\nQuestion: {input}\n\nAnswer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as "
        "you can, using a single phrase or sentence if possible. If the question cannot be "
        'answered based on the information in the article, write "unanswerable". If the '
        'question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide '
        "any explanation.\n\nArticle: {context}\n\n Answer the question based on the above "
        "article as concisely as you can, using a single phrase or sentence if possible. If the "
        'question cannot be answered based on the information in the article, write "unanswerable"'
        '. If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not '
        "provide any explanation.\n\nQuestion: {input}\n\nAnswer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
        "question based on the above text, only give me the answer and do not output any other "
        "words.\n\nQuestion: {input}\nAnswer:"
    ),
    "hotpotqa": (
        "Answer the question based on the given passages. Only give me the answer and do not "
        "output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the "
        "question based on the given passages. Only give me the answer and do not output any "
        "other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "2wikimqa": (
        "Answer the question based on the given passages. Only give me the answer and do not "
        "output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the "
        "question based on the given passages. Only give me the answer and do not output any "
        "other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "musique": (
        "Answer the question based on the given passages. Only give me the answer and do not "
        "output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the "
        "question based on the given passages. Only give me the answer and do not output any "
        "other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report."
        "\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. "
        "Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the "
        "query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}"
        "\nAnswer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
        "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:"
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions."
        "\n\n{context}\n{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not "
        "output any other words. The following are some examples.\n\n{context}\n\n{input}"
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples."
        "\n\n{context}\n\n{input}"
    ),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
        "Please carefully read these paragraphs and determine how many unique paragraphs there "
        "are after removing duplicates. In other words, how many non-repeating paragraphs are "
        "there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after "
        "removing duplicates. The output format should only contain the number, such as 1, 2, 3, "
        "and so on.\n\nThe final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
        "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n"
        "{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer "
        'format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: '
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# Verbatim from config/dataset2maxlen.json.
MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "lcc": 64,
    "repobench-p": 64,
}

# pred.py: "chat models are better off without build prompts on these tasks" (few-shot and code).
NO_CHAT_TEMPLATE = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})

DATASETS: tuple[str, ...] = tuple(PROMPT_TEMPLATES)


def _fill(part: str, values: dict[str, str]) -> str:
    """Replace ``{context}`` and ``{input}`` in one pass (values may hold braces themselves)."""
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], part)


@dataclass(frozen=True)
class PromptFormat:
    """How one dataset turns a record into prompt text.

    Attributes
    ----------
    template : str
        Prompt with exactly one ``{context}`` and at most one ``{input}``.
    max_new_tokens : int
        Greedy decoding length.
    use_chat_template : bool
        Wrap the prompt in the model's chat template.
    """

    template: str
    max_new_tokens: int
    use_chat_template: bool

    def __post_init__(self) -> None:
        if self.template.count("{context}") != 1 or self.template.count("{input}") > 1:
            raise ValueError(
                f"The prompt template must hold '{{context}}' exactly once and '{{input}}' at most "
                f"once, got {self.template!r}; fix the template."
            )

    def parts(self, context: str, input_text: str) -> tuple[str, str]:
        """Fill the template and split it after the context.

        Parameters
        ----------
        context : str
            The record's context (possibly truncated).
        input_text : str
            The record's input (question, abstract, code prefix...).

        Returns
        -------
        tuple[str, str]
            ``(context part, question part)``; their concatenation is the filled template.
        """
        cut = self.template.index("{context}") + len("{context}")
        values = {"context": context, "input": input_text}
        return _fill(self.template[:cut], values), _fill(self.template[cut:], values)


PROMPT_FORMATS: dict[str, PromptFormat] = {
    name: PromptFormat(PROMPT_TEMPLATES[name], MAX_NEW_TOKENS[name], name not in NO_CHAT_TEMPLATE)
    for name in DATASETS
}


def _count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _keep_ends(tokenizer: Any, ids: list[int], keep: int) -> str:
    """Decode the first ``keep // 2`` and the last ``keep - keep // 2`` tokens, joined."""
    head = keep // 2
    tail_start = len(ids) - (keep - head)
    return tokenizer.decode(ids[:head], skip_special_tokens=True) + tokenizer.decode(
        ids[tail_start:], skip_special_tokens=True
    )


def truncate_middle(
    tokenizer: Any, fmt: PromptFormat, context: str, input_text: str, max_prompt_tokens: int
) -> str:
    """Cut the middle out of the context until the filled prompt fits the token budget.

    As in LongBench's ``pred.py`` the first and last halves are kept, since instructions and the
    most relevant text tend to sit at the ends. Decoding and re-encoding can shift the count by a
    token, so the cut is repeated until the prompt fits.

    Parameters
    ----------
    tokenizer : Any
        A Hugging Face tokenizer (``encode``/``decode``).
    fmt : PromptFormat
        The dataset's prompt format.
    context : str
        The record's context.
    input_text : str
        The record's input.
    max_prompt_tokens : int
        Budget for the prompt text (context part + question part), without special tokens.

    Returns
    -------
    str
        The context, shortened if needed.

    Raises
    ------
    ValueError
        If the prompt does not fit even with an empty context.
    """
    excess = _count_tokens(tokenizer, "".join(fmt.parts(context, input_text))) - max_prompt_tokens
    if excess <= 0:
        return context
    ids = tokenizer.encode(context, add_special_tokens=False)
    keep = len(ids)
    while excess > 0:
        if keep == 0:
            raise ValueError(
                f"The prompt is over max_prompt_tokens={max_prompt_tokens} even with an empty "
                "context; raise max_prompt_tokens."
            )
        keep = max(keep - excess, 0)
        context = _keep_ends(tokenizer, ids, keep)
        prompt = "".join(fmt.parts(context, input_text))
        excess = _count_tokens(tokenizer, prompt) - max_prompt_tokens
    return context


def build_example(
    example_id: str,
    record: dict[str, Any],
    fmt: PromptFormat,
    subtask: str,
    tokenizer: Any,
    max_prompt_tokens: int,
) -> Example:
    """Turn one record of the official schema into an :class:`Example`.

    Parameters
    ----------
    example_id : str
        Identifier of the example.
    record : dict
        Fields ``input``, ``context``, ``answers`` and optionally ``all_classes``, ``length``.
    fmt : PromptFormat
        The dataset's prompt format.
    subtask : str
        Name reported as ``metadata["subtask"]``.
    tokenizer : Any
        Tokenizer used to fit the prompt into ``max_prompt_tokens``.
    max_prompt_tokens : int
        Token budget of the prompt text.

    Returns
    -------
    Example
        The formatted example.
    """
    input_text = record["input"] or ""
    context = truncate_middle(tokenizer, fmt, record["context"], input_text, max_prompt_tokens)
    context_part, question_part = fmt.parts(context, input_text)
    return Example(
        example_id=example_id,
        context=context_part,
        question=question_part,
        answers=list(record["answers"]),
        max_new_tokens=fmt.max_new_tokens,
        use_chat_template=fmt.use_chat_template,
        metadata={
            "subtask": subtask,
            "all_classes": record.get("all_classes"),
            "length": record.get("length"),
        },
    )


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "list"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def check_record(record: Any, where: str) -> dict[str, Any]:
    """``record`` as a record of the LongBench schema, or a ValueError naming ``where`` and the
    field at fault.

    Parameters
    ----------
    record : Any
        One decoded record.
    where : str
        Where it comes from, e.g. ``"line 3 of data/qasper.jsonl"``.

    Returns
    -------
    dict
        The record itself.
    """
    if not isinstance(record, dict):
        raise ValueError(
            f"{where} holds a JSON {json_type(record)}, not an object; every line must be an "
            f"object with the fields {list(_REQUIRED_FIELDS)}."
        )
    for name in _REQUIRED_FIELDS:
        if name not in record:
            raise ValueError(
                f"{where} lacks the field {name!r}; every line needs {list(_REQUIRED_FIELDS)}."
            )
    expected = {
        "input": (str, type(None)),
        "context": (str,),
        "answers": (list,),
        "all_classes": (list, type(None)),
        "_id": (str, int),
    }
    for name, types in expected.items():
        value = record.get(name)
        if name not in record or isinstance(value, types) and not isinstance(value, bool):
            continue
        wanted = " or ".join(
            {str: "a string", list: "a list of strings", int: "a number", type(None): "null"}[t]
            for t in types
        )
        raise ValueError(
            f"{where}: field {name!r} holds {json.dumps(value)[:40]}, not {wanted}; fix that line."
        )
    if not record["answers"]:
        raise ValueError(f"{where}: field 'answers' is empty; give at least one reference answer.")
    for name in ("answers", "all_classes"):
        if any(not isinstance(item, str) for item in record.get(name) or []):
            raise ValueError(
                f"{where}: field {name!r} must be a list of strings, got "
                f"{json.dumps(record[name])[:60]}; fix that line."
            )
    return record


def read_jsonl(path: Path, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file in the LongBench schema, each checked by :func:`check_record`.

    Parameters
    ----------
    path : Path
        The file.
    limit : int or None
        Read at most this many records.

    Yields
    ------
    dict
        One record per non-empty line.

    Raises
    ------
    ValueError
        Naming the file, the line number and the field, if a line is not a JSON object, lacks
        ``input``, ``context`` or ``answers``, or holds a field of the wrong type.
    """
    with path.open("rb") as handle:
        lines = ((number, line) for number, line in enumerate(handle, start=1) if line.strip())
        for number, line in islice(lines, limit):
            where = f"line {number} of {path}"
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                raise ValueError(f"{where} is not UTF-8 text; save the file as UTF-8.") from None
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{where} is not valid JSON ({error.msg} at column {error.colno}); fix or "
                    "delete that line."
                ) from None
            yield check_record(record, where)


def check_jsonl(path: Path, limit: int | None = None) -> None:
    """Read every record :func:`read_jsonl` would yield, so a bad line is refused before any
    model loads."""
    for _ in read_jsonl(path, limit):
        pass


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the hub answers at all (so an offline machine fails in seconds, not retries)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return True  # offline mode reads the local datasets cache; let load_dataset decide
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _load_hub(name: str, limit: int | None) -> Iterable[dict[str, Any]]:
    """The test split of one LongBench dataset from the Hugging Face hub."""
    import datasets

    if not hub_reachable():
        raise ValueError(
            f"The Hugging Face hub cannot be reached to load {HUB_DATASET} '{name}'; download "
            "the official JSONL files (data.zip) and pass task.data_dir=<folder of official "
            "JSONL files>."
        )
    try:
        data = datasets.load_dataset(HUB_DATASET, name, split="test")
    except Exception as err:
        raise ValueError(
            f"Could not load {HUB_DATASET} '{name}' from the Hugging Face hub ({err}); download "
            "the official JSONL files (data.zip) and pass task.data_dir=<folder of official "
            "JSONL files>."
        ) from err
    return (
        check_record(dict(r), f"{HUB_DATASET} '{name}' record {i}")
        for i, r in enumerate(islice(data, limit))
    )


def _check_limit(max_examples: int | None) -> None:
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be a positive integer or None, got {max_examples}.")


@dataclass
class LongBench:
    """LongBench's 16 English and code datasets (Bai et al. 2023, arXiv 2308.14508).

    Single- and multi-document QA, summarisation, few-shot learning, synthetic counting and
    retrieval, and code completion over long inputs; each dataset has its official prompt,
    generation length and metric (see :mod:`capkv.metrics`).

    Attributes
    ----------
    datasets : list[str]
        Datasets to run, a subset of :data:`DATASETS` (default: all 16).
    data_dir : str or None
        Folder holding the official ``<dataset>.jsonl`` files (from LongBench's ``data.zip``).
        When None, datasets are loaded from the hub with
        ``datasets.load_dataset("THUDM/LongBench", name, split="test")``.
    max_examples : int or None
        Use only the first this many examples of each dataset (None: all).
    name : str
        Task name (results directory).
    """

    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    data_dir: str | None = None
    max_examples: int | None = None
    name: str = "longbench"

    def __post_init__(self) -> None:
        if isinstance(self.datasets, str):
            self.datasets = [self.datasets]
        self.datasets = list(self.datasets)
        unknown = [name for name in self.datasets if name not in PROMPT_FORMATS]
        if unknown:
            raise ValueError(
                f"Unknown LongBench dataset(s) {unknown}; choose from {list(DATASETS)}."
            )
        _check_limit(self.max_examples)
        if self.data_dir is not None:
            self._check_data_dir(Path(self.data_dir))

    def _check_data_dir(self, folder: Path) -> None:
        if not folder.is_dir():
            raise ValueError(
                f"data_dir {str(folder)!r} is not a folder; pass task.data_dir=<folder of "
                "official LongBench JSONL files>, or task.data_dir=null to load from the hub."
            )
        for name in self.datasets:
            if not (folder / f"{name}.jsonl").is_file():
                raise ValueError(
                    f"{name}.jsonl was not found in data_dir {str(folder.resolve())!r}; put the "
                    "official LongBench JSONL files there or drop the dataset from task.datasets."
                )
            check_jsonl(folder / f"{name}.jsonl", self.max_examples)

    def _records(self, name: str) -> Iterable[dict[str, Any]]:
        if self.data_dir is None:
            return _load_hub(name, self.max_examples)
        return read_jsonl(Path(self.data_dir) / f"{name}.jsonl", self.max_examples)

    def examples(self, tokenizer: Any, max_prompt_tokens: int) -> Iterator[Example]:
        """Yield the examples of every selected dataset, prompts fitted to the token budget.

        Parameters
        ----------
        tokenizer : Any
            The model's tokenizer.
        max_prompt_tokens : int
            Budget for the prompt text (context + question), without special tokens.

        Yields
        ------
        Example
            ``example_id`` is ``"<dataset>/<_id>"``; metadata holds ``subtask``,
            ``all_classes`` and ``length``.
        """
        for name in self.datasets:
            fmt = PROMPT_FORMATS[name]
            for index, record in enumerate(self._records(name)):
                example_id = f"{name}/{record.get('_id', index)}"
                yield build_example(example_id, record, fmt, name, tokenizer, max_prompt_tokens)

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        """Official LongBench score of one prediction (see :func:`score_prediction`).

        Parameters
        ----------
        prediction : str
            Model output.
        example : Example
            The example it answers.

        Returns
        -------
        dict[str, float]
            ``{"score": value in [0, 1]}``.
        """
        metadata = example.metadata
        value = score_prediction(
            metadata["subtask"], prediction, example.answers, metadata["all_classes"]
        )
        return {"score": value}


@dataclass
class CustomJsonlTask:
    """Any JSONL file in the LongBench schema, scored with one of the LongBench metrics.

    Each line holds ``input``, ``context``, ``answers`` (list) and optionally ``all_classes`` and
    ``_id``. Prompts are built, split and truncated as for :class:`LongBench`.

    Attributes
    ----------
    path : str
        The JSONL file.
    metric : str
        Name of a metric in :data:`capkv.metrics.METRICS`.
    template : str
        Prompt with ``{context}`` once and ``{input}`` at most once; the example's context is the
        template up to and including ``{context}``. If ``{input}`` comes before ``{context}`` it
        therefore lands in the context part.
    max_new_tokens : int
        Greedy decoding length.
    use_chat_template : bool
        Wrap the prompt in the model's chat template.
    first_line_only : bool
        Score only the first line of the prediction (LongBench does so for few-shot datasets).
    max_examples : int or None
        Use only the first this many lines (None: all).
    name : str
        Task name (results directory); also the ``subtask`` of every example.
    """

    path: str
    metric: str
    template: str
    max_new_tokens: int
    use_chat_template: bool = True
    first_line_only: bool = False
    max_examples: int | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"Unknown metric {self.metric!r}; choose from {list(METRICS)}.")
        if not Path(self.path).is_file():
            raise ValueError(
                f"JSONL file {str(Path(self.path).resolve())!r} does not exist; set task.path to "
                "a JSONL file with input, context and answers fields."
            )
        _check_limit(self.max_examples)
        if self.max_new_tokens < 1:
            raise ValueError(
                f"max_new_tokens must be a positive number of tokens, got {self.max_new_tokens}; "
                "pass e.g. task.max_new_tokens=64."
            )
        check_jsonl(Path(self.path), self.max_examples)
        self._format = PromptFormat(self.template, self.max_new_tokens, self.use_chat_template)

    def examples(self, tokenizer: Any, max_prompt_tokens: int) -> Iterator[Example]:
        """Yield one example per line, prompts fitted to the token budget.

        Parameters
        ----------
        tokenizer : Any
            The model's tokenizer.
        max_prompt_tokens : int
            Budget for the prompt text (context + question), without special tokens.

        Yields
        ------
        Example
            ``example_id`` is ``"<name>/<_id>"`` (the line index when ``_id`` is absent).
        """
        records = read_jsonl(Path(self.path), self.max_examples)
        for index, record in enumerate(records):
            example_id = f"{self.name}/{record.get('_id', index)}"
            yield build_example(
                example_id, record, self._format, self.name, tokenizer, max_prompt_tokens
            )

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        """Best score of the chosen metric over the reference answers.

        Parameters
        ----------
        prediction : str
            Model output.
        example : Example
            The example it answers.

        Returns
        -------
        dict[str, float]
            ``{"score": value in [0, 1]}``.
        """
        if self.first_line_only:
            prediction = first_line(prediction)
        metric = METRICS[self.metric]
        value = best_score(metric, prediction, example.answers, example.metadata["all_classes"])
        return {"score": value}
