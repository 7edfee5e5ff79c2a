"""Needle in a haystack: a grid of context lengths x needle depths over Paul Graham's essays.

Kamradt's test (github.com/gkamradt/LLMTest_NeedleInAHaystack) hides one sentence, the needle, at
a given depth of a haystack of essays cut to a given length and asks for it back; results are drawn
as a heatmap (x = length, y = depth). The default needle is RULER's (Hsieh et al. 2024, arXiv
2404.06654): a 7-digit "special magic number" for a random key, scored by string match, plus a
graded score (edit similarity of the digits) because small models under eviction drop single
digits long before they lose the needle (docs/methods.md, "Tasks and their prompts").
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from capkv.tasks.base import Example, Reporting
from capkv.tasks.common import (
    MAGIC_NUMBER_INTRO,
    check_prompt_fits,
    magic_key,
    magic_number,
    normalize_text,
    prompt_tokens,
)
from capkv.tasks.haystack import build_haystack, insert_needles

HEADLINE = "exact"

NEEDLE_KINDS: dict[str, dict[str, str]] = {
    "magic_number": {
        "intro": MAGIC_NUMBER_INTRO,
        "needle": "One of the special magic numbers for {key} is: {value}.",
        "question": "What is the special magic number for {key} mentioned in the provided text?",
        "answer": "{value}",
        "answer_prefix": "The special magic number for {key} mentioned in the provided text is",
    },
    "san_francisco": {
        "intro": "",
        "needle": "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park "
        "on a sunny day.",
        "question": "What is the best thing to do in San Francisco?",
        "answer": "eat a sandwich and sit in Dolores Park on a sunny day",
        "answer_prefix": "The best thing to do in San Francisco is",
    },
}
_DEFAULT_MAX_NEW_TOKENS = {"magic_number": 16, "san_francisco": 32}


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions) between two strings."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b))
            )
        previous = current
    return previous[-1]


def digit_similarity(prediction: str, value: str) -> float:
    """1 - edit distance / longer length, between the first run of digits and ``value``.

    0 when the prediction has no digit. " 349233." against "3492333" scores 1 - 1/7.
    """
    match = re.search(r"\d+", prediction)
    if match is None:
        return 0.0
    digits = match.group()
    return 1.0 - levenshtein(digits, value) / max(len(digits), len(value))


def rouge1_recall(prediction: str, reference: str) -> float:
    """ROUGE-1 recall: clipped fraction of the reference's words found in the prediction."""
    reference_words = Counter(normalize_text(reference).split())
    if not reference_words:
        return 0.0
    overlap = reference_words & Counter(normalize_text(prediction).split())
    return sum(overlap.values()) / sum(reference_words.values())


@dataclass
class NeedleTask:
    """Needle-in-a-haystack grid over Paul Graham's essays (Kamradt; needles as in RULER).

    One example per (context length, depth) cell. The user prompt is
    ``"<intro>\\n<essays with the needle>\\n\\n<question>"`` (RULER's NIAH template) with the answer
    prefix opening the assistant turn (docs/methods.md, "Tasks and their prompts").

    Parameters
    ----------
    context_lengths : list[int]
        Length of the context (essays with the needle inserted) in tokens of the model's
        tokenizer, within a few tokens. The defaults stop at 6k tokens, the longest at which
        SmolLM2-135M-Instruct with its full cache still finds the needle (experiments/README.md).
    depths : list[float]
        Needle depths in percent of the context (0 = first sentence, 100 = end).
    needle_kind : str
        ``"magic_number"``: RULER's "One of the special magic numbers for {key} is: {value}." with
        a 7-digit value and an adjective-noun key, both drawn per cell from ``seed``;
        ``"san_francisco"``: Kamradt's original needle "The best thing to do in San Francisco is
        eat a sandwich and sit in Dolores Park on a sunny day.", without an intro, as Kamradt's.
    intro, needle, question, answer, answer_prefix : str, optional
        Override the kind's texts; ``{key}`` and ``{value}`` are filled in per cell. The intro
        precedes the essays on a line of its own; an empty intro leaves the essays alone.
    seed : int
        Seed of the per-cell keys and values.
    max_new_tokens : int, optional
        Greedy decoding length; 16 for magic numbers, 32 for the free-text needle by default.
    name : str
        Results directory name.

    Notes
    -----
    Scores: ``exact`` is RULER's string match (the answer is contained in the prediction, case
    insensitive; normalised text for the free-text needle); ``graded`` is the edit similarity of
    the prediction's first number to the magic number, or ROUGE-1 recall of the answer's words
    for the free-text needle.
    """

    context_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 3072, 4096, 5120, 6144])
    depths: list[float] = field(default_factory=lambda: [0.0, 25.0, 50.0, 75.0, 100.0])
    needle_kind: str = "magic_number"
    intro: str | None = None
    needle: str | None = None
    question: str | None = None
    answer: str | None = None
    answer_prefix: str | None = None
    seed: int = 42
    max_new_tokens: int | None = None
    name: str = "needle"

    def __post_init__(self) -> None:
        if self.needle_kind not in NEEDLE_KINDS:
            raise ValueError(
                f"needle_kind must be one of {sorted(NEEDLE_KINDS)}, got {self.needle_kind!r}"
            )
        self.context_lengths = [int(length) for length in self.context_lengths]
        self.depths = [float(depth) for depth in self.depths]
        if any(length <= 0 for length in self.context_lengths):
            raise ValueError(f"context_lengths must be positive, got {self.context_lengths}")
        if any(not 0 <= depth <= 100 for depth in self.depths):
            raise ValueError(f"depths must be percentages in [0, 100], got {self.depths}")
        if self.max_new_tokens is None:
            self.max_new_tokens = _DEFAULT_MAX_NEW_TOKENS[self.needle_kind]
        if self.max_new_tokens < 1:
            raise ValueError(
                f"max_new_tokens must be a positive number of tokens, got {self.max_new_tokens}; "
                "pass task.max_new_tokens=16, or null for the needle kind's default."
            )

    @classmethod
    def reporting(cls, config: Mapping[str, Any]) -> Reporting:
        """The needle benchmark (its per-example grid is tabled), headline ``exact``."""
        return Reporting("needle", HEADLINE)

    def texts(self, context_length: int, depth: float) -> dict[str, str]:
        """Intro, needle, question, answer and answer prefix of one cell, key and value filled in."""
        rng = random.Random(f"{self.seed}:{context_length}:{depth}")
        fill = {"key": magic_key(rng), "value": magic_number(rng)}
        overrides = {
            "intro": self.intro,
            "needle": self.needle,
            "question": self.question,
            "answer": self.answer,
            "answer_prefix": self.answer_prefix,
        }
        return {
            part: (default if overrides[part] is None else overrides[part]).format(**fill)
            for part, default in NEEDLE_KINDS[self.needle_kind].items()
        }

    def example(self, tokenizer: Any, context_length: int, depth: float) -> Example:
        """The example of one (length, depth) cell."""
        texts = self.texts(context_length, depth)
        needle_tokens = len(tokenizer(" " + texts["needle"], add_special_tokens=False)["input_ids"])
        haystack = build_haystack(tokenizer, max(context_length - needle_tokens, 0))
        essays = insert_needles(tokenizer, haystack, [texts["needle"]], [depth])
        return Example(
            example_id=f"len{context_length}_depth{depth:g}",
            context=f"{texts['intro']}\n{essays}" if texts["intro"] else essays,
            question="\n\n" + texts["question"],
            answers=[texts["answer"]],
            max_new_tokens=self.max_new_tokens,
            use_chat_template=True,
            answer_prefix=texts["answer_prefix"],
            metadata={
                "context_length": context_length,
                "depth": depth,
                "needle_value": texts["answer"],
            },
        )

    def examples(self, tokenizer: Any, max_prompt_tokens: int) -> Iterator[Example]:
        """Yield one example per (length, depth) cell, lengths outer.

        Raises
        ------
        ValueError
            Before yielding anything, if some length cannot hold the intro and the needle, or
            its prompt does not fit ``max_prompt_tokens``.
        """
        for length in self.context_lengths:
            self.check_holds(tokenizer, length)
        examples = [
            self.example(tokenizer, length, depth)
            for length in self.context_lengths
            for depth in self.depths
        ]
        for example in examples:
            check_prompt_fits(tokenizer, example, max_prompt_tokens)
        yield from examples

    def check_holds(self, tokenizer: Any, context_length: int) -> None:
        """Refuse a context length that cannot hold the task's fixed parts (intro and needle),
        saying how many tokens they take: such a context would silently be longer than asked."""
        texts = self.texts(context_length, self.depths[0] if self.depths else 0.0)
        context = f"{texts['intro']}\n{texts['needle']}" if texts["intro"] else texts["needle"]
        fixed = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        if context_length <= fixed:
            rest = Example(
                example_id="",
                context="",
                question="\n\n" + texts["question"],
                answers=[],
                max_new_tokens=self.max_new_tokens,
                use_chat_template=True,
                answer_prefix=texts["answer_prefix"],
            )
            around = prompt_tokens(tokenizer, rest)
            raise ValueError(
                f"context length {context_length} cannot hold the needle task's fixed parts: its "
                f"intro and needle take {fixed} tokens of the context (the question, answer "
                f"prefix and chat template {around} more of the prompt); pass "
                f"task.context_lengths=[...] of at least {fixed + 1} tokens."
            )

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        """``exact`` (string match) and ``graded`` (digit edit similarity or ROUGE-1 recall)."""
        answer = example.answers[0]
        if self.needle_kind == "magic_number":
            exact = float(answer.lower() in prediction.lower())
            return {"exact": exact, "graded": digit_similarity(prediction, answer)}
        exact = float(normalize_text(answer) in normalize_text(prediction))
        return {"exact": exact, "graded": rouge1_recall(prediction, answer)}
