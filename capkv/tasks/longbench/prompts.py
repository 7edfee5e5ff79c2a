"""LongBench prompts: the template of a dataset filled with a record, cut in the middle to the
model's prompt limit as ``pred.py`` cuts it, and split where the question starts.

``pred.py`` fills the template, tokenises it (special tokens included) and, when it is longer than
the model's ``max_length``, keeps the decoded first and last ``max_length / 2`` tokens. We do the
same with the runner's prompt limit (:func:`capkv.harness.runner.max_prompt_tokens`, the window less room
for the answer and the chat template) as ``max_length``, then split the prompt after the context:
everything before the template's text that follows ``{context}`` becomes :attr:`Example.context`,
the rest (instructions after the context, ``{input}``, "Answer:") :attr:`Example.question`, so
that ``context + question`` is exactly the official prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from capkv.tasks.base import Example
from capkv.tasks.longbench.settings import DATASETS, SETTINGS

_PLACEHOLDER = re.compile(r"\{(context|input)\}")


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
    name: PromptFormat(
        SETTINGS[name].template, SETTINGS[name].max_new_tokens, SETTINGS[name].chat_template
    )
    for name in DATASETS
}


def _token_count(tokenizer: Any, text: str) -> int:
    """Tokens of ``text`` as ``pred.py`` counts them: ``tokenizer(prompt)``, special tokens in."""
    return len(tokenizer(text)["input_ids"])


def truncate_middle(tokenizer: Any, prompt: str, max_prompt_tokens: int) -> tuple[str, str]:
    """The official middle truncation of a whole prompt to ``max_prompt_tokens`` tokens.

    ``pred.py``: tokenise the filled prompt (special tokens included); if it has more than
    ``max_length`` tokens, keep the decoded first ``int(max_length / 2)`` and last
    ``int(max_length / 2)`` tokens (``skip_special_tokens=True``), joined, since instructions and
    the question sit at the ends. One departure, where the official prompt would not fit: when
    decoding and re-encoding makes the joined text longer than the limit (a token or two, at the
    seam), both halves shrink until it fits.

    Parameters
    ----------
    tokenizer : Any
        A Hugging Face tokenizer.
    prompt : str
        The filled template.
    max_prompt_tokens : int
        The model's prompt limit (pred.py's ``max_length``).

    Returns
    -------
    tuple[str, str]
        ``(head, tail)``: the kept beginning and end, ``("", prompt)`` when nothing is cut.

    Raises
    ------
    ValueError
        If the limit is too small to keep a token at each end.
    """
    ids = tokenizer(prompt)["input_ids"]
    if len(ids) <= max_prompt_tokens:
        return "", prompt
    half = int(max_prompt_tokens / 2)
    while half >= 1:
        head = tokenizer.decode(ids[:half], skip_special_tokens=True)
        tail = tokenizer.decode(ids[-half:], skip_special_tokens=True)
        excess = _token_count(tokenizer, head + tail) - max_prompt_tokens
        if excess <= 0:
            return head, tail
        half -= (excess + 1) // 2
    raise ValueError(
        f"max_prompt_tokens={max_prompt_tokens} is too small to keep the ends of a LongBench "
        "prompt; use a model with a longer window."
    )


def fit_parts(
    tokenizer: Any, fmt: PromptFormat, context: str, input_text: str, max_prompt_tokens: int
) -> tuple[str, str]:
    """The prompt's context and question parts, the whole prompt cut as ``pred.py`` cuts it.

    The question part is the template's text after ``{context}``, filled; when the cut leaves it
    whole at the end of the prompt, the split falls just before it. When the cut reaches into it
    (a question longer than half the limit) the split falls at the cut: the kept end of the
    prompt is the question part. Either way ``context + question`` is the official prompt.

    Parameters
    ----------
    tokenizer : Any
        A Hugging Face tokenizer.
    fmt : PromptFormat
        The dataset's prompt format.
    context : str
        The record's context.
    input_text : str
        The record's input.
    max_prompt_tokens : int
        The model's prompt limit.

    Returns
    -------
    tuple[str, str]
        ``(context part, question part)``.
    """
    context_part, question_part = fmt.parts(context, input_text)
    head, tail = truncate_middle(tokenizer, context_part + question_part, max_prompt_tokens)
    prompt = head + tail
    if prompt.endswith(question_part):
        return prompt[: len(prompt) - len(question_part)], question_part
    return head, tail


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
    context_part, question_part = fit_parts(
        tokenizer, fmt, record["context"], input_text, max_prompt_tokens
    )
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
