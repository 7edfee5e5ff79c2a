"""What every RULER task shares: sizing each example to its sequence length, seeding, checking
and RULER's ``string_match_all`` score.

A context length is RULER's ``max_seq_length``: the tokens of context, question and answer prefix
(no chat template) plus ``max_new_tokens`` stay within it (:func:`capkv.tasks.common.prompt_limit`).
Each example is filled to the largest haystack (or word list) that fits, searched with the
tokenizer.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from capkv.tasks.base import Example
from capkv.tasks.common import check_prompt_fits, prompt_limit

# RULER's "repeat" haystack (niah_single_1) and the noise of its variable tracking.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HAYSTACKS = ("essay", "repeat")
_PLAIN = {"add_special_tokens": False, "verbose": False}


class Prompt(NamedTuple):
    """The prompt parts and references of one example, before it gets its id; the prompts of
    one context's several questions share ``context`` (:meth:`RulerTask.prompts`)."""

    context: str
    question: str
    answer_prefix: str
    answers: list[str]


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER's ``string_match_all``: fraction of references contained in the prediction."""
    prediction = prediction.lower()
    return sum(reference.lower() in prediction for reference in references) / len(references)


def _largest_fitting(fits: Callable[[int], bool], guess: int) -> int:
    """Largest size >= 1 with ``fits(size)``, searched from ``guess``; 0 when none fits.

    Gallops away from the guess with doubling steps, then bisects; ``fits`` is assumed
    (roughly) monotone, and the returned size was checked to fit.
    """
    low, high, step = 0, max(guess, 1), 1
    if fits(high):
        low = high
        while fits(low + step):
            low, step = low + step, step * 2
        high = low + step
    else:
        while high > 1:
            probe = max(high - step, 1)
            if fits(probe):
                low = probe
                break
            high, step = probe, step * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


@dataclass
class RulerTask:
    """Common machinery of the RULER tasks: sizing, seeding, checking and scoring.

    Parameters
    ----------
    context_lengths : list[int]
        RULER sequence lengths in tokens (prompt without chat template + ``max_new_tokens``).
    num_examples : int
        Examples per context length.
    seed : int
        Seed; example ``i`` of length ``L`` is drawn from ``(seed, subtask, L, i)`` alone.
    max_new_tokens : int
        Greedy decoding length (RULER's ``tokens_to_generate``).
    subtask : str
        RULER task name, reported in ``metadata["subtask"]`` and the example ids.
    family : str
        RULER's family of the task (NIAH, Variable tracking, Aggregation), reported by the suite.
    name : str
        Results directory name.
    """

    context_lengths: list[int] = field(default_factory=lambda: [4096])
    num_examples: int = 20
    seed: int = 42
    max_new_tokens: int = 128
    subtask: str = ""
    family: str = ""
    name: str = ""
    # Example i of a length is drawn from (seed, subtask, length, i) alone, its size searched from
    # example i - 1's: a run with more examples extends a folder of fewer (Task's EXTENT_SETTINGS).
    EXTENT_SETTINGS: ClassVar[tuple[str, ...]] = ("num_examples",)

    def __post_init__(self) -> None:
        self.context_lengths = [int(length) for length in self.context_lengths]
        if any(length <= self.max_new_tokens for length in self.context_lengths):
            raise ValueError(
                f"context_lengths must exceed max_new_tokens={self.max_new_tokens}, "
                f"got {self.context_lengths}"
            )
        if self.num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {self.num_examples}")
        if getattr(self, "haystack", "essay") not in HAYSTACKS:
            raise ValueError(f"haystack must be one of {HAYSTACKS}, got {self.haystack!r}")

    def prompt(self, tokenizer: Any, rng: random.Random, context_length: int, size: int) -> Prompt:
        """One example with a haystack (or word list) of ``size`` units; per task."""
        raise NotImplementedError

    def prompts(
        self, tokenizer: Any, rng: random.Random, context_length: int, size: int
    ) -> list[Prompt]:
        """The prompts of one context, one per question asked of it, with the same ``context``
        text: the one :meth:`prompt` unless a task asks several questions."""
        return [self.prompt(tokenizer, rng, context_length, size)]

    def _used_tokens(self, tokenizer: Any, parts: list[Prompt]) -> int:
        """Tokens of the longest of the prompts (context, question and answer prefix, no chat
        template): the one every question of the context must fit."""
        return max(
            len(tokenizer(f"{p.context}{p.question} {p.answer_prefix}", **_PLAIN)["input_ids"])
            for p in parts
        )

    def size_limit(self) -> int | None:
        """Largest usable size (e.g. the vocabulary), or None when unbounded."""
        return None

    def examples(self, tokenizer: Any, max_prompt_tokens: int) -> Iterator[Example]:
        """Yield ``num_examples`` contexts per context length, lengths outer: one example each,
        or one per question (consecutively, in asking order) where a task asks several.

        Raises
        ------
        ValueError
            Before yielding anything, if some prompt does not fit ``max_prompt_tokens`` or a
            length is too short for the task.
        """
        examples = []
        for length in self.context_lengths:
            size = length // 4
            for index in range(self.num_examples):
                asked, size = self._fit(tokenizer, length, index, size)
                for example in asked:
                    check_prompt_fits(tokenizer, example, max_prompt_tokens)
                examples += asked
        yield from examples

    def _fit(
        self, tokenizer: Any, context_length: int, index: int, guess: int
    ) -> tuple[list[Example], int]:
        """The examples of context ``index`` (one per question) at the largest size at which
        every question's prompt fits ``context_length``, and that size."""
        built: dict[int, list[Prompt]] = {}
        limit = self.size_limit()

        def fits(size: int) -> bool:
            if limit is not None and size > limit:
                return False
            rng = random.Random(f"{self.seed}:{self.subtask}:{context_length}:{index}")
            built[size] = parts = self.prompts(tokenizer, rng, context_length, size)
            used = self._used_tokens(tokenizer, parts)
            return used <= prompt_limit(context_length, self.max_new_tokens)

        size = _largest_fitting(fits, guess)
        if size == 0:
            fixed = self.fixed_tokens(tokenizer, context_length, index)
            raise ValueError(
                f"context length {context_length} cannot hold RULER {self.subtask}'s fixed parts: "
                f"its intro, needles or items, question and answer prefix take {fixed} tokens and "
                f"the answer max_new_tokens={self.max_new_tokens} more; pass "
                f"task.context_lengths=[...] of at least about {fixed + self.max_new_tokens + 1}."
            )
        asked = built[size]
        examples = []
        for question, parts in enumerate(asked):
            example_id = f"{self.subtask}_len{context_length}_{index:03d}"
            metadata: dict[str, Any] = {"subtask": self.subtask, "context_length": context_length}
            if len(asked) > 1:
                example_id += f"_q{question}"
                metadata |= {"num_questions": len(asked), "question_index": question}
            examples.append(
                Example(
                    example_id=example_id,
                    context=parts.context,
                    question=parts.question,
                    answers=parts.answers,
                    max_new_tokens=self.max_new_tokens,
                    use_chat_template=True,
                    answer_prefix=parts.answer_prefix,
                    metadata=metadata,
                )
            )
        return examples, size

    def fixed_tokens(self, tokenizer: Any, context_length: int, index: int) -> int:
        """Tokens of example ``index``'s prompt at the smallest size (no haystack, or one unit
        of a word list): what every context length must hold besides the answer."""
        for size in (0, 1):
            rng = random.Random(f"{self.seed}:{self.subtask}:{context_length}:{index}")
            try:
                parts = self.prompts(tokenizer, rng, context_length, size)
            except (ValueError, IndexError, ZeroDivisionError):
                continue
            return self._used_tokens(tokenizer, parts)
        return 0

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        """``string_match_all`` over the references."""
        return {"string_match_all": string_match_all(prediction, example.answers)}
