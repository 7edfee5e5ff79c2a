"""RULER's needle-in-a-haystack family: single, multi-key, multi-value and multi-query needles.

One task, :class:`NiahTask`; its variants are configurations (``conf/task/ruler/niah_*.yaml``).
With ``num_questions`` > 1 each context is asked several questions, each about keys not asked
before (for the ``shared_context`` protocols, which prefill and compress a context once).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from capkv.tasks.common import MAGIC_NUMBER_INTRO, distinct, magic_key, magic_number
from capkv.tasks.haystack import build_haystack, insert_needles
from capkv.tasks.ruler.base import NOISE, Prompt, RulerTask

# RULER samples each needle's depth from 40 evenly spaced depths.
NEEDLE_DEPTHS = tuple(round(100 * i / 39) for i in range(40))

# RULER's NIAH intro, question and answer prefix, keyed by "one value asked for" (singular).
NIAH_TEXTS = {
    True: (
        MAGIC_NUMBER_INTRO,
        "What is the special magic number for {query} mentioned in the provided text?",
        "The special magic number for {query} mentioned in the provided text is",
    ),
    False: (
        "Some special magic numbers are hidden within the following text. Make sure to memorize "
        "it. I will quiz you about the numbers afterwards.",
        "What are all the special magic numbers for {query} mentioned in the provided text?",
        "The special magic numbers for {query} mentioned in the provided text are",
    ),
}


def _join_keys(keys: list[str]) -> str:
    """ "a", "a, and b", "a, b, and c" as RULER lists queried keys."""
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


@dataclass
class NiahTask(RulerTask):
    """RULER needle in a haystack with magic-number needles ("niah_single", by default).

    ``num_keys`` keys with ``num_values`` 7-digit values each are hidden as sentences "One of the
    special magic numbers for {key} is: {value}." at depths drawn from 40 evenly spaced ones;
    ``num_queries`` of the keys are asked for and all their values are the references. The
    defaults are RULER's niah_single_2 (``haystack="essay"``; niah_single_1 with ``"repeat"``);
    ``conf/task/ruler/niah_*.yaml`` hold the suite's variants.

    Parameters
    ----------
    num_keys : int
        Keys hidden; those not asked for are distractors (RULER's ``num_needle_k``).
    num_values : int
        Values per key (``num_needle_v``).
    num_queries : int
        Keys asked for at once (``num_needle_q``; at least that many keys are hidden).
    haystack : str
        ``"essay"``: Paul Graham's essays; ``"repeat"``: RULER's repeated noise sentences.
    num_questions : int
        Questions asked of each context, each about ``num_queries`` keys not asked before; the
        context then hides ``max(num_keys, num_questions * num_queries)`` keys (niah_multikey's
        4 keys are each asked in turn with 4 questions). With 1, RULER's one question (ids
        ``{subtask}_len{L}_{index:03d}``); otherwise the context's examples follow each other
        with ids ``..._q{j}`` and ``num_questions`` and ``question_index`` in their metadata, and
        the context is sized so that its longest question fits.
    """

    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    haystack: str = "essay"
    num_questions: int = 1
    subtask: str = "niah_single"
    family: str = "NIAH"
    name: str = "ruler_niah_single"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_num_questions(self.num_questions)
        needles = self.hidden_keys() * self.num_values
        if needles > len(NEEDLE_DEPTHS):
            raise ValueError(
                f"RULER {self.subtask} would hide {needles} needles (keys x values) but places "
                f"them at {len(NEEDLE_DEPTHS)} distinct depths; pass fewer task.num_questions "
                "(or num_keys, num_queries, num_values)."
            )

    def hidden_keys(self) -> int:
        """Keys hidden in each context: enough for every question to ask new ones."""
        return max(self.num_keys, self.num_questions * self.num_queries)

    def shares_contexts(self) -> bool:
        """Whether a context is asked several questions (``num_questions`` > 1)."""
        return self.num_questions > 1

    def prompt(self, tokenizer: Any, rng: random.Random, context_length: int, size: int) -> Prompt:
        """The context's first question (its only one, by default)."""
        return self.prompts(tokenizer, rng, context_length, size)[0]

    def prompts(
        self, tokenizer: Any, rng: random.Random, context_length: int, size: int
    ) -> list[Prompt]:
        """One context and its ``num_questions`` questions, each about keys not asked before."""
        keys = distinct(lambda: magic_key(rng), self.hidden_keys())
        numbers = distinct(lambda: magic_number(rng), len(keys) * self.num_values)
        values = [numbers[i :: len(keys)] for i in range(len(keys))]
        needles = [
            f"One of the special magic numbers for {key} is: {value}."
            for key, key_values in zip(keys, values, strict=True)
            for value in key_values
        ]
        rng.shuffle(needles)
        depths = rng.sample(NEEDLE_DEPTHS, len(needles))
        asked = rng.sample(range(len(keys)), self.num_questions * self.num_queries)
        haystack = build_haystack(tokenizer, size, None if self.haystack == "essay" else NOISE)
        body = insert_needles(tokenizer, haystack, needles, depths)
        intro, question, prefix = NIAH_TEXTS[self.num_queries * self.num_values == 1]
        prompts = []
        for start in range(0, len(asked), self.num_queries):
            queried = asked[start : start + self.num_queries]
            query = _join_keys([keys[i] for i in queried])
            answers = [value for i in queried for value in values[i]]
            prompts.append(
                Prompt(
                    f"{intro}\n{body}",
                    f"\n{question.format(query=query)}",
                    prefix.format(query=query),
                    answers,
                )
            )
        return prompts


def check_num_questions(value: Any) -> None:
    """Refuse, in one line, a ``num_questions`` that is not a positive integer."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"task.num_questions={value!r} is not a number of questions of at least 1; pass e.g. "
            "task.num_questions=4 (or 1 for RULER's one question per context)."
        )
