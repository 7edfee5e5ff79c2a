"""What every task hands the runner: examples made of prompt parts, references and a scorer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Example:
    """One benchmark example, already formatted as text.

    The full user prompt is ``context + question``. Under the ``query_aware`` protocol both parts
    are prefilled (and compressed) together; under ``context_only`` only ``context`` is prefilled
    and compressed, and ``question`` is fed afterwards. Tasks therefore put every piece of the
    question (instructions that follow the context, the question itself, "Answer:") in
    ``question``.

    Attributes
    ----------
    example_id : str
        Stable identifier, unique within the task (used to resume runs).
    context : str
        The long part of the prompt.
    question : str
        Everything that follows the context in the user prompt.
    answers : list[str]
        Reference answers; the score is the maximum over them.
    max_new_tokens : int
        Greedy decoding length.
    use_chat_template : bool
        Wrap the prompt in the model's chat template (user turn, then the assistant header).
    answer_prefix : str
        Text placed at the start of the model's answer (after the assistant header), e.g.
        "The special magic number for X mentioned in the provided text is".
    metadata : dict
        Task-specific fields the scorer or the result tables need (needle depth and length,
        LongBench ``all_classes``...). The key ``"subtask"`` (e.g. the LongBench dataset name)
        makes the runner report scores per subtask as well as their average.
    """

    example_id: str
    context: str
    question: str
    answers: list[str]
    max_new_tokens: int
    use_chat_template: bool = True
    answer_prefix: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


# score(prediction, answers, metadata) -> float in [0, 1] (or a dict of named scores in [0, 1]).
Scorer = Callable[[str, list[str], dict[str, Any]], "float | dict[str, float]"]


class Task(Protocol):
    """A task yields examples and scores predictions; one task = one results directory."""

    name: str

    def examples(self, tokenizer: Any, max_prompt_tokens: int) -> Iterator[Example]:
        """Yield the examples; ``max_prompt_tokens`` bounds the tokenised prompt length."""
        ...

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        """Named scores in [0, 1] for one prediction; the first key is the headline score."""
        ...


@dataclass
class CappedTask:
    """A task limited to its first ``max_examples`` examples per subtask (per task without any).

    ``max_examples`` means the same for every task this way: a needle grid, each RULER subtask,
    each LongBench dataset, a custom file.

    Attributes
    ----------
    task : Task
        The task to cap.
    max_examples : int
        Examples kept per ``metadata["subtask"]``, in the task's order.
    """

    task: Task
    max_examples: int

    @property
    def name(self) -> str:
        return self.task.name

    def examples(self, tokenizer: Any, max_prompt_tokens: int) -> Iterator[Example]:
        """The task's examples, at most ``max_examples`` of each subtask."""
        taken: dict[Any, int] = {}
        for example in self.task.examples(tokenizer, max_prompt_tokens):
            subtask = example.metadata.get("subtask")
            if taken.get(subtask, 0) < self.max_examples:
                taken[subtask] = taken.get(subtask, 0) + 1
                yield example

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        return self.task.score(prediction, example)


def capped(task: Task, max_examples: int | None) -> Task:
    """``task`` limited to ``max_examples`` examples per subtask (itself when None)."""
    return task if max_examples is None else CappedTask(task, max_examples)
