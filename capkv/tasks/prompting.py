"""From an Example to token ids: the context part and the question part, split once.

Both protocols see exactly the same tokens: the prompt is rendered once (with the model's chat
template where the task asks for it), split where the question starts, and the two pieces are
tokenised separately, unless a token would merge across the split: then the whole prompt's
tokens are split instead (:func:`tokenize_prompt`), so that the ids are always those of the
prompt as one text. ``query_aware`` prefills ``context_ids + question_ids`` together;
``context_only`` prefills ``context_ids`` and feeds ``question_ids`` after compression.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from capkv.tasks.base import Example

_SPLIT = "\x00CAPKV-QUESTION-STARTS-HERE\x00"


@dataclass
class PromptIds:
    """Token ids (1, n) of the two parts of a prompt."""

    context_ids: torch.Tensor
    question_ids: torch.Tensor

    @property
    def length(self) -> int:
        return self.context_ids.shape[1] + self.question_ids.shape[1]

    def full(self) -> torch.Tensor:
        return torch.cat([self.context_ids, self.question_ids], dim=1)


def render_parts(tokenizer: Any, example: Example) -> tuple[str, str]:
    """The prompt text before and after the point where the question starts."""
    if example.use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": example.context + _SPLIT + example.question}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        before, after = text.split(_SPLIT)
        return before, after + example.answer_prefix
    return example.context, example.question + example.answer_prefix


def tokenize_prompt(tokenizer: Any, example: Example) -> PromptIds:
    """Tokenise the two parts; the beginning-of-sequence token, if any, opens the context.

    The ids are always those of the whole prompt tokenised as one text (what a model given the
    prompt as a string would read, e.g. LongBench's ``pred.py``): the two parts are tokenised
    apart, and where a token would merge across the seam, so that the two lists differ from the
    whole one, the whole one is split instead, before its first token that starts in the question
    (a fast tokenizer's character offsets; a token across the seam stays with the context).
    """
    before, after = render_parts(tokenizer, example)
    templated = example.use_chat_template and getattr(tokenizer, "chat_template", None)
    context = tokenizer(before, add_special_tokens=not templated)["input_ids"]
    question = tokenizer(after, add_special_tokens=False)["input_ids"]
    if after and getattr(tokenizer, "is_fast", False):
        whole = tokenizer(
            before + after, add_special_tokens=not templated, return_offsets_mapping=True
        )
        if context + question != whole["input_ids"]:
            ids, offsets = whole["input_ids"], whole["offset_mapping"]
            starts = (i for i, (start, end) in enumerate(offsets) if end > start >= len(before))
            split = next(starts, len(ids))
            context, question = ids[:split], ids[split:]
    # token ids stay integers when a part is empty (a reading task has no question)
    return PromptIds(
        torch.tensor([context], dtype=torch.long), torch.tensor([question], dtype=torch.long)
    )


def prompt_overhead(tokenizer: Any) -> int:
    """Tokens the chat template adds around the user's text (to budget the prompt length)."""
    example = Example("probe", "", "", [], 1)
    before, after = render_parts(tokenizer, example)
    return len(tokenizer(before + after, add_special_tokens=True)["input_ids"]) + 1
