"""LongBench prompts: the template of a dataset filled with a record, split after the context,
the context cut in the middle to fit the prompt budget.

Each official template is split after ``{context}``: the part up to and including the context
becomes :attr:`Example.context`, the rest (instructions that follow the context, ``{input}``,
"Answer:") becomes :attr:`Example.question`, so that ``context + question`` is exactly the
official prompt.

Difference from ``pred.py``: it cuts the middle out of the whole tokenised prompt; we cut the
middle out of the context only, so that the instructions and the question are never cut, and we
count the tokens of the prompt text without special tokens or chat template (the runner's limit,
:func:`capkv.tasks.common.prompt_limit`, leaves room for those).
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
