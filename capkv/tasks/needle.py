"""Needle in a haystack: a grid of context lengths x needle depths over Paul Graham's essays.

Kamradt's test (github.com/gkamradt/LLMTest_NeedleInAHaystack) hides one sentence, the needle, at
a given depth of a haystack of essays cut to a given length and asks for it back; results are drawn
as a heatmap (x = length, y = depth). The default needle is RULER's (Hsieh et al. 2024, arXiv
2404.06654): a 7-digit "special magic number" for a random key, scored by string match, plus a
graded score (edit similarity of the digits) because small models under eviction drop single
digits long before they lose the needle (docs/methods.md, "Tasks and their prompts").

With ``num_needles`` k > 1, each cell's context hides k magic-number needles with distinct keys,
as RULER's multi-key NIAH does, and each is asked in turn: k examples share one context, which the
``shared_context`` protocols prefill and compress once.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from capkv.tasks.base import Example, Reporting
from capkv.tasks.common import (
    MAGIC_NUMBER_INTRO,
    check_prompt_fits,
    distinct,
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
# Distinct adjective-noun keys magic_key can draw (40 adjectives x 40 nouns).
MAX_NEEDLES = 1600


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

    One example per (context length, depth) cell, or with ``num_needles`` k > 1 one context per
    cell asked k questions (k examples). The user prompt is
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
    num_needles : int
        Needles hidden in each cell's context (k). With 1, one needle at the cell's depth, one
        example per cell. With k > 1 (RULER's multi-key style: k distinct keys and values drawn
        per cell from ``seed``), needle ``j`` sits at depth ``(d + j * 100 / k) mod 100`` (needle
        0 at the cell's depth ``d``) and the cell yields k examples with the same context, one
        per needle, in a seeded shuffled asking order (so that turn and depth are not
        confounded), ids ``len{L}_depth{d}_key{j}``. The haystack is shortened by all k needles'
        tokens, so the context stays about ``L`` tokens. Needs needles with keys: the
        ``magic_number`` kind, and ``{key}`` in an overridden needle and question. The intro is
        the kind's (one number asked per question, as NiahTask's multi-key intro).
    num_samples : int
        Needles drawn per (length, depth) cell, each its own example (its own key and value,
        so its own needle sentence and question; the free-text needle has one sentence, so its
        samples differ by nothing but their ids). Sample ``s`` > 0 is drawn from ``(seed,
        length, depth, s)``, sample 0 from ``(seed, length, depth)`` as before this setting
        existed, ids ``len{L}_depth{d}`` then ``len{L}_depth{d}_s{s}``: a run with more samples
        extends a folder of fewer (:data:`EXTENT_SETTINGS`).
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
    The metadata of every example holds ``context_length``, ``depth`` (its own needle's) and
    ``needle_value``; with k > 1 also ``context_depth`` (the cell's depth), ``num_needles`` and
    ``needle_index``; with several samples also ``sample``.
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
    num_needles: int = 1
    num_samples: int = 1
    name: str = "needle"
    EXTENT_SETTINGS: ClassVar[tuple[str, ...]] = ("num_samples",)

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
        self._check_num_needles()
        count = self.num_samples
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(
                f"task.num_samples={count!r} is not a number of needles per cell of at least 1; "
                "pass e.g. task.num_samples=3 (or 1 for one needle per length and depth)."
            )

    def _check_num_needles(self) -> None:
        """Refuse, in one line, a needle count that is not a positive integer, or several needles
        that the question could not tell apart."""
        count = self.num_needles
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(
                f"task.num_needles={count!r} is not a number of needles of at least 1; pass "
                "e.g. task.num_needles=4 (or 1 for one needle per context)."
            )
        if count == 1:
            return
        if count > MAX_NEEDLES:
            raise ValueError(
                f"task.num_needles={count} exceeds the {MAX_NEEDLES} distinct keys the needles "
                f"can have; pass task.num_needles of at most {MAX_NEEDLES}."
            )
        if self.needle_kind == "san_francisco":
            raise ValueError(
                f"task.num_needles={count} needs needles with distinct keys, but "
                "needle_kind=san_francisco hides one fixed needle; pass "
                "task.needle_kind=magic_number or task.num_needles=1."
            )
        for part in ("needle", "question"):
            override = getattr(self, part)
            if override is not None and "{key}" not in override:
                raise ValueError(
                    f"task.{part}={override!r} has no {{key}}, so its {count} needles could not "
                    f"be told apart; put {{key}} in task.{part} or pass task.num_needles=1."
                )

    def shares_contexts(self) -> bool:
        """Whether a context is asked several questions (``num_needles`` > 1)."""
        return self.num_needles > 1

    @classmethod
    def reporting(cls, config: Mapping[str, Any]) -> Reporting:
        """The needle benchmark (its per-example grid is tabled), headline ``exact``."""
        return Reporting("needle", HEADLINE)

    def fills(self, context_length: int, depth: float, sample: int = 0) -> list[dict[str, str]]:
        """The ``num_needles`` distinct keys and values of one cell's sample ``sample``, drawn
        from the seed."""
        rng = random.Random(self._seed_text(context_length, depth, sample))
        keys = distinct(lambda: magic_key(rng), self.num_needles)
        values = distinct(lambda: magic_number(rng), self.num_needles)
        return [{"key": key, "value": value} for key, value in zip(keys, values, strict=True)]

    def _seed_text(self, context_length: int, depth: float, sample: int) -> str:
        """What one sample of a cell is drawn from (sample 0: as before samples existed)."""
        text = f"{self.seed}:{context_length}:{depth}"
        return text if sample == 0 else f"{text}:sample{sample}"

    def needle_depths(self, depth: float) -> list[float]:
        """Depth of each needle of a cell at ``depth``: needle ``j`` at ``(depth + j * 100 / k)
        mod 100``, needle 0 at ``depth`` itself (100 included)."""
        count = self.num_needles
        return [depth] + [(depth + j * 100 / count) % 100 for j in range(1, count)]

    def asking_order(self, context_length: int, depth: float, sample: int = 0) -> list[int]:
        """The needle indices of a cell's sample in the order they are asked: seeded, shuffled."""
        order = list(range(self.num_needles))
        if self.num_needles > 1:
            seed_text = self._seed_text(context_length, depth, sample)
            random.Random(f"{seed_text}:order").shuffle(order)
        return order

    def texts(
        self, context_length: int, depth: float, index: int = 0, sample: int = 0
    ) -> dict[str, str]:
        """Intro, needle, question, answer and answer prefix of needle ``index`` of one cell's
        sample ``sample``, its key and value filled in."""
        fill = self.fills(context_length, depth, sample)[index]
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

    def example(
        self, tokenizer: Any, context_length: int, depth: float, sample: int = 0
    ) -> Example:
        """The example of one (length, depth) cell's sample (the first asked, with several
        needles)."""
        return self.cell(tokenizer, context_length, depth, sample)[0]

    def cell(
        self, tokenizer: Any, context_length: int, depth: float, sample: int = 0
    ) -> list[Example]:
        """The examples of one (length, depth) cell's sample ``sample``, in asking order: one,
        or with k needles k sharing one context."""
        count = self.num_needles
        texts = [self.texts(context_length, depth, j, sample) for j in range(count)]
        depths = self.needle_depths(depth)
        needles = [part["needle"] for part in texts]
        needle_tokens = sum(
            len(tokenizer(" " + needle, add_special_tokens=False)["input_ids"])
            for needle in needles
        )
        haystack = build_haystack(tokenizer, max(context_length - needle_tokens, 0))
        essays = insert_needles(tokenizer, haystack, needles, depths)
        intro = texts[0]["intro"]
        context = f"{intro}\n{essays}" if intro else essays
        examples = []
        for j in self.asking_order(context_length, depth, sample):
            metadata: dict[str, Any] = {
                "context_length": context_length,
                "depth": depths[j],
                "needle_value": texts[j]["answer"],
            }
            example_id = f"len{context_length}_depth{depth:g}"
            if sample > 0:
                metadata["sample"] = sample
                example_id += f"_s{sample}"
            if count > 1:
                metadata |= {"context_depth": depth, "num_needles": count, "needle_index": j}
                example_id += f"_key{j}"
            examples.append(
                Example(
                    example_id=example_id,
                    context=context,
                    question="\n\n" + texts[j]["question"],
                    answers=[texts[j]["answer"]],
                    max_new_tokens=self.max_new_tokens,
                    use_chat_template=True,
                    answer_prefix=texts[j]["answer_prefix"],
                    metadata=metadata,
                )
            )
        return examples

    def examples(self, tokenizer: Any, max_prompt_tokens: int) -> Iterator[Example]:
        """Yield the examples of each (length, depth) cell, lengths outer, then depths, then
        samples: one per sample, or with k needles the sample's k examples consecutively, in
        their asking order.

        Raises
        ------
        ValueError
            Before yielding anything, if some length cannot hold the intro and the needles, or
            its prompt does not fit ``max_prompt_tokens``.
        """
        for length in self.context_lengths:
            self.check_holds(tokenizer, length)
        examples = [
            example
            for length in self.context_lengths
            for depth in self.depths
            for sample in range(self.num_samples)
            for example in self.cell(tokenizer, length, depth, sample)
        ]
        for example in examples:
            check_prompt_fits(tokenizer, example, max_prompt_tokens)
        yield from examples

    def check_holds(self, tokenizer: Any, context_length: int) -> None:
        """Refuse a context length that cannot hold the task's fixed parts (intro and needles),
        saying how many tokens they take: such a context would silently be longer than asked."""
        depth = self.depths[0] if self.depths else 0.0
        every = [self.texts(context_length, depth, j) for j in range(self.num_needles)]
        texts = every[0]
        needles = " ".join(part["needle"] for part in every)
        context = f"{texts['intro']}\n{needles}" if texts["intro"] else needles
        what, fewer = "needle", ""
        if self.num_needles > 1:
            what, fewer = f"{self.num_needles} needles", " (or fewer task.num_needles)"
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
                f"intro and {what} take {fixed} tokens of the context (the question, answer "
                f"prefix and chat template {around} more of the prompt); pass "
                f"task.context_lengths=[...] of at least {fixed + 1} tokens{fewer}."
            )

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        """``exact`` (string match) and ``graded`` (digit edit similarity or ROUGE-1 recall)."""
        answer = example.answers[0]
        if self.needle_kind == "magic_number":
            exact = float(answer.lower() in prediction.lower())
            return {"exact": exact, "graded": digit_similarity(prediction, answer)}
        exact = float(normalize_text(answer) in normalize_text(prediction))
        return {"exact": exact, "graded": rouge1_recall(prediction, answer)}
