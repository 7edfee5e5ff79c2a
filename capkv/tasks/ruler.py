"""RULER's synthetic tasks, generated here for the model's own tokenizer.

RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?", arXiv 2404.06654, github.com/NVIDIA/RULER) extends the needle test to retrieval with
distractors and several answers (NIAH single, multi-key, multi-value, multi-query), multi-hop
tracing (variable tracking) and aggregation (common and frequent words extraction). Prompts follow
RULER's templates (``scripts/data/synthetic/constants.py``); the part after the context is the
question and RULER's answer prefix opens the assistant turn. Every task is scored as RULER scores
it, with ``string_match_all``: the fraction of the references contained in the prediction, case
insensitive (RULER keeps ``string_match_part`` for its QA tasks, which are not generated here).

A context length is RULER's ``max_seq_length``: the tokens of context, question and answer prefix
(no chat template) plus ``max_new_tokens`` stay within it. Each example is filled to the largest
haystack (or word list) that fits, searched with the tokenizer.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, NamedTuple

from capkv.tasks.base import Example
from capkv.tasks.haystack import build_haystack, insert_needles, read_essays
from capkv.tasks.needle import MAGIC_NUMBER_INTRO, check_prompt_fits, magic_key, magic_number

# RULER's "repeat" haystack (niah_single_1) and the noise of its variable tracking.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HAYSTACKS = ("essay", "repeat")
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
# Noise tokens of the solved variable-tracking example that precedes the task (RULER's one-shot).
VT_DEMO_TOKENS = 128


class Prompt(NamedTuple):
    """The prompt parts and references of one example, before it gets its id."""

    context: str
    question: str
    answer_prefix: str
    answers: list[str]


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER's ``string_match_all``: fraction of references contained in the prediction."""
    prediction = prediction.lower()
    return sum(reference.lower() in prediction for reference in references) / len(references)


def _distinct(draw: Callable[[], str], count: int) -> list[str]:
    """``count`` distinct results of ``draw()``, in the order first drawn."""
    items: dict[str, None] = {}
    while len(items) < count:
        items[draw()] = None
    return list(items)


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
    name : str
        Results directory name.
    """

    context_lengths: list[int] = field(default_factory=lambda: [4096])
    num_examples: int = 20
    seed: int = 42
    max_new_tokens: int = 128
    subtask: str = ""
    name: str = ""

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

    def size_limit(self) -> int | None:
        """Largest usable size (e.g. the vocabulary), or None when unbounded."""
        return None

    def examples(self, tokenizer: Any, max_prompt_tokens: int) -> Iterator[Example]:
        """Yield ``num_examples`` examples per context length, lengths outer.

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
                example, size = self._fit(tokenizer, length, index, size)
                check_prompt_fits(tokenizer, example, max_prompt_tokens)
                examples.append(example)
        yield from examples

    def _fit(
        self, tokenizer: Any, context_length: int, index: int, guess: int
    ) -> tuple[Example, int]:
        """Example ``index`` at the largest size that fits ``context_length``, and that size."""
        built: dict[int, Prompt] = {}
        limit = self.size_limit()

        def fits(size: int) -> bool:
            if limit is not None and size > limit:
                return False
            rng = random.Random(f"{self.seed}:{self.subtask}:{context_length}:{index}")
            built[size] = parts = self.prompt(tokenizer, rng, context_length, size)
            text = f"{parts.context}{parts.question} {parts.answer_prefix}"
            used = len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
            return used + self.max_new_tokens <= context_length

        size = _largest_fitting(fits, guess)
        if size == 0:
            raise ValueError(
                f"context length {context_length} is too short for RULER {self.subtask} with "
                f"max_new_tokens={self.max_new_tokens}; pass longer task.context_lengths=[...]"
            )
        parts = built[size]
        example = Example(
            example_id=f"{self.subtask}_len{context_length}_{index:03d}",
            context=parts.context,
            question=parts.question,
            answers=parts.answers,
            max_new_tokens=self.max_new_tokens,
            use_chat_template=True,
            answer_prefix=parts.answer_prefix,
            metadata={"subtask": self.subtask, "context_length": context_length},
        )
        return example, size

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        """``string_match_all`` over the references."""
        return {"string_match_all": string_match_all(prediction, example.answers)}


def _join_keys(keys: list[str]) -> str:
    """ "a", "a, and b", "a, b, and c" as RULER lists queried keys."""
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


@dataclass
class NiahTask(RulerTask):
    """RULER needle in a haystack with magic-number needles ("niah_single", by default).

    ``num_keys`` keys with ``num_values`` 7-digit values each are hidden as sentences "One of the
    special magic numbers for {key} is: {value}." at depths drawn from 40 evenly spaced ones;
    ``num_queries`` of the keys are asked for and all their values are the references. The
    defaults are RULER's niah_single_2 (``haystack="essay"``; niah_single_1 with ``"repeat"``).

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
    """

    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    haystack: str = "essay"
    subtask: str = "niah_single"
    name: str = "ruler_niah_single"

    def prompt(self, tokenizer: Any, rng: random.Random, context_length: int, size: int) -> Prompt:
        keys = _distinct(lambda: magic_key(rng), max(self.num_keys, self.num_queries))
        numbers = _distinct(lambda: magic_number(rng), len(keys) * self.num_values)
        values = [numbers[i :: len(keys)] for i in range(len(keys))]
        needles = [
            f"One of the special magic numbers for {key} is: {value}."
            for key, key_values in zip(keys, values, strict=True)
            for value in key_values
        ]
        rng.shuffle(needles)
        depths = rng.sample(NEEDLE_DEPTHS, len(needles))
        queried = rng.sample(range(len(keys)), self.num_queries)
        haystack = build_haystack(tokenizer, size, None if self.haystack == "essay" else NOISE)
        body = insert_needles(tokenizer, haystack, needles, depths)
        query = _join_keys([keys[i] for i in queried])
        intro, question, prefix = NIAH_TEXTS[self.num_queries * self.num_values == 1]
        answers = [value for i in queried for value in values[i]]
        return Prompt(
            f"{intro}\n{body}",
            f"\n{question.format(query=query)}",
            prefix.format(query=query),
            answers,
        )


@dataclass
class NiahMultiKey(NiahTask):
    """RULER niah_multikey_1: four keys hidden in the essays, one asked for."""

    num_keys: int = 4
    subtask: str = "niah_multikey"
    name: str = "ruler_niah_multikey"


@dataclass
class NiahMultiValue(NiahTask):
    """RULER niah_multivalue: one key with four values, all asked for."""

    num_values: int = 4
    subtask: str = "niah_multivalue"
    name: str = "ruler_niah_multivalue"


@dataclass
class NiahMultiQuery(NiahTask):
    """RULER niah_multiquery: four keys hidden, all four asked for at once."""

    num_queries: int = 4
    subtask: str = "niah_multiquery"
    name: str = "ruler_niah_multiquery"


def _variable_chains(
    rng: random.Random, num_chains: int, num_hops: int, name_length: int
) -> tuple[list[list[str]], list[str]]:
    """Variable names per chain and each chain's value (RULER's ``generate_chains``)."""
    names = _distinct(
        lambda: "".join(rng.choices(string.ascii_uppercase, k=name_length)),
        num_chains * (num_hops + 1),
    )
    chains = [names[i::num_chains] for i in range(num_chains)]
    values = _distinct(lambda: str(rng.randint(10000, 99999)), num_chains)
    return chains, values


def _chain_statements(chain: list[str], value: str) -> list[str]:
    """``VAR A = 12345``, ``VAR B = VAR A``, ... in assignment order."""
    return [f"VAR {chain[0]} = {value}"] + [
        f"VAR {after} = VAR {before}" for before, after in zip(chain[:-1], chain[1:], strict=True)
    ]


@dataclass
class VariableTrackingTask(RulerTask):
    """RULER variable tracking ("vt"): follow chains of assignments hidden in a haystack.

    ``num_chains`` chains ``VAR A = 12345``, ``VAR B = VAR A``, ... (``num_hops`` hops each) are
    inserted in order at random sentence ends; the question asks for every variable assigned the
    first chain's value. As in RULER, a short solved example (3-letter names, noise haystack)
    precedes the task.

    Parameters
    ----------
    num_chains : int
        Chains inserted; all but the first are distractors.
    num_hops : int
        Assignments after the first in each chain (the answer has ``num_hops + 1`` names).
    haystack : str
        ``"essay"`` (RULER's vt config) or ``"repeat"`` (noise sentences).
    """

    num_chains: int = 1
    num_hops: int = 4
    haystack: str = "essay"
    max_new_tokens: int = 30
    subtask: str = "vt"
    name: str = "ruler_vt"

    def _solved(
        self, tokenizer: Any, rng: random.Random, size: int, text: str | None, name_length: int
    ) -> Prompt:
        chains, values = _variable_chains(rng, self.num_chains, self.num_hops, name_length)
        statements, depths = [], []
        for chain, value in zip(chains, values, strict=True):
            statements += _chain_statements(chain, value)
            depths += sorted(rng.uniform(0, 100) for _ in chain)
        haystack = build_haystack(tokenizer, size, text)
        intro = (
            "Memorize and track the chain(s) of variable assignment hidden in the following text."
        )
        body = insert_needles(tokenizer, haystack, statements, depths)
        question = f"Question: Find all variables that are assigned the value {values[0]} in the "
        question += "text above."
        prefix = "Answer: According to the chain(s) of variable assignment in the text above, "
        prefix += f"{self.num_hops + 1} variables are assigned the value {values[0]}, they are:"
        return Prompt(f"{intro}\n\n{body}", f"\n{question}", prefix, chains[0])

    def prompt(self, tokenizer: Any, rng: random.Random, context_length: int, size: int) -> Prompt:
        demo = self._solved(tokenizer, rng, VT_DEMO_TOKENS, NOISE, name_length=3)
        solved = f"{demo.context}{demo.question} {demo.answer_prefix} {' '.join(demo.answers)}"
        text = None if self.haystack == "essay" else NOISE
        task = self._solved(tokenizer, rng, size, text, name_length=5)
        return task._replace(context=f"{solved}\n\n{task.context}")


@lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """Distinct lowercase words of five letters or more in the essays, sorted.

    RULER draws its common words from the wonderwords noun, adjective and verb lists; the essays
    give a vocabulary of about 7,000 words without another dependency.
    """
    return tuple(sorted(set(re.findall(r"\b[a-z]{5,}\b", read_essays()))))


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


@dataclass
class CommonWordsTask(RulerTask):
    """RULER common words extraction ("cwe"): the ``num_cw`` most frequent words of a list.

    ``size`` distinct words are drawn; ``num_cw`` of them appear ``freq_cw`` times, the others
    ``freq_ucw`` times, shuffled into a numbered list. As in RULER, lengths under 4096 use 6 and 1
    repetitions, and a solved example (40 words, 10 and 3 repetitions; 20 words, 3 and 1 under
    4096) precedes the task.

    Parameters
    ----------
    freq_cw : int
        Repetitions of each common word.
    freq_ucw : int
        Repetitions of each uncommon word.
    num_cw : int
        Number of common words (the answer).
    """

    freq_cw: int = 30
    freq_ucw: int = 3
    num_cw: int = 10
    max_new_tokens: int = 120
    subtask: str = "cwe"
    name: str = "ruler_cwe"

    def size_limit(self) -> int:
        return len(essay_words())

    def _solved(
        self, rng: random.Random, num_words: int, freq_cw: int, freq_ucw: int
    ) -> tuple[str, list[str]]:
        words = rng.sample(essay_words(), num_words)
        common, uncommon = words[: self.num_cw], words[self.num_cw :]
        listing = common * freq_cw + uncommon * freq_ucw
        rng.shuffle(listing)
        intro = "Below is a numbered list of words. In these words, some appear more often than "
        intro += "others. Memorize the ones that appear most often."
        return f"{intro}\n{_numbered(listing)}", common

    def prompt(self, tokenizer: Any, rng: random.Random, context_length: int, size: int) -> Prompt:
        short = context_length < 4096
        demo_shape = (20, 3, 1) if short else (40, 10, 3)
        demo, demo_answers = self._solved(rng, *demo_shape)
        freqs = (6, 1) if short else (self.freq_cw, self.freq_ucw)
        context, answers = self._solved(rng, max(size, self.num_cw), *freqs)
        question = f"Question: What are the {self.num_cw} most common words in the above list?"
        prefix = f"Answer: The top {self.num_cw} words that appear most often in the list are:"
        solved = f"{demo}\n{question} {prefix} {_numbered(demo_answers)}"
        return Prompt(f"{solved}\n{context}", f"\n{question}", prefix, answers)


def _zeta(alpha: float, terms: int = 1000) -> float:
    """Riemann zeta(alpha) for alpha > 1 (Euler-Maclaurin tail after ``terms`` terms)."""
    head = sum(k**-alpha for k in range(1, terms))
    return head + terms ** (1 - alpha) / (alpha - 1) + terms**-alpha / 2


@dataclass
class FrequentWordsTask(RulerTask):
    """RULER frequent words extraction ("fwe"): the three most frequent coded words.

    A vocabulary of random ``coded_wordlen``-letter words (``(length - max_new_tokens) // 50`` of
    them, at least 10, as in RULER) is ranked at random; the word of rank ``k`` appears
    ``int(size * k**-alpha / zeta(alpha))`` times (Zipf). Rank 1 is replaced by the noise "..."
    and ranks 2 to 4 are the answer.

    Parameters
    ----------
    alpha : float
        Zipf exponent (> 1); larger concentrates the counts on the top words.
    coded_wordlen : int
        Letters per coded word.
    """

    alpha: float = 2.0
    coded_wordlen: int = 6
    max_new_tokens: int = 50
    subtask: str = "fwe"
    name: str = "ruler_fwe"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha <= 1:
            raise ValueError(f"alpha must be > 1 for a Zipf distribution, got {self.alpha}")

    def prompt(self, tokenizer: Any, rng: random.Random, context_length: int, size: int) -> Prompt:
        vocab_size = max((context_length - self.max_new_tokens) // 50, 10)
        letters = string.ascii_lowercase
        vocab = _distinct(lambda: "".join(rng.choices(letters, k=self.coded_wordlen)), vocab_size)
        vocab[0] = "..."
        norm = _zeta(self.alpha)
        words = [
            word
            for rank, word in enumerate(vocab, start=1)
            for _ in range(int(size * rank**-self.alpha / norm))
        ]
        rng.shuffle(words)
        intro = "Read the following coded text and track the frequency of each coded word. Find "
        intro += "the three most frequently appeared coded words."
        question = "Question: Do not provide any explanation. Please ignore the dots '....'. What "
        question += "are the three most frequently appeared words in the above coded text?"
        prefix = "Answer: According to the coded text above, the three most frequently appeared "
        prefix += "words are:"
        return Prompt(f"{intro} {' '.join(words)}", f"\n{question}", prefix, vocab[1:4])


RULER_TASKS: dict[str, type[RulerTask]] = {
    "niah_single": NiahTask,
    "niah_multikey": NiahMultiKey,
    "niah_multivalue": NiahMultiValue,
    "niah_multiquery": NiahMultiQuery,
    "vt": VariableTrackingTask,
    "cwe": CommonWordsTask,
    "fwe": FrequentWordsTask,
}


@dataclass
class RulerSuite:
    """Several RULER tasks as one task; scores are reported per ``metadata["subtask"]``.

    Parameters
    ----------
    subtasks : list[str]
        Names from :data:`RULER_TASKS` (all seven by default).
    context_lengths, num_examples, seed :
        Passed to every subtask.
    haystack : str
        Passed to the subtasks that have one (NIAH and variable tracking).
    name : str
        Results directory name.
    """

    subtasks: list[str] = field(default_factory=lambda: list(RULER_TASKS))
    context_lengths: list[int] = field(default_factory=lambda: [4096])
    num_examples: int = 20
    seed: int = 42
    haystack: str = "essay"
    name: str = "ruler"
    tasks: dict[str, RulerTask] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.subtasks) - set(RULER_TASKS))
        if unknown:
            raise ValueError(f"unknown RULER subtasks {unknown}; choose from {list(RULER_TASKS)}")
        shared = {
            "context_lengths": list(self.context_lengths),
            "num_examples": self.num_examples,
            "seed": self.seed,
            "haystack": self.haystack,
        }
        self.tasks = {}
        for subtask in self.subtasks:
            task_class = RULER_TASKS[subtask]
            accepted = {f.name for f in fields(task_class)}
            self.tasks[subtask] = task_class(**{k: v for k, v in shared.items() if k in accepted})

    def examples(self, tokenizer: Any, max_prompt_tokens: int) -> Iterator[Example]:
        """Every subtask's examples, in ``subtasks`` order, all checked before the first yield."""
        yield from [
            example
            for task in self.tasks.values()
            for example in task.examples(tokenizer, max_prompt_tokens)
        ]

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        """The score of the example's own subtask."""
        return self.tasks[example.metadata["subtask"]].score(prediction, example)
