"""What every task hands the runner: examples made of prompt parts, references and a scorer."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from hydra.utils import get_class


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


@dataclass(frozen=True)
class Reporting:
    """How a task's scores are reported; every run saves it in its ``metrics.json``.

    Attributes
    ----------
    benchmark : str
        The benchmark the task belongs to (``needle``, ``ruler``, ``longbench``, ``custom``);
        the needle's runs also get a per-example table.
    headline : str
        The score the main table reports (a key of the task's scores).
    families : dict[str, str]
        The family of each subtask, in the benchmark's order; the main table adds a column per
        family. A subtask not named is a family of its own.
    """

    benchmark: str
    headline: str
    families: dict[str, str] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        """The ``metrics.json`` fields."""
        return {"benchmark": self.benchmark, "headline": self.headline, "families": self.families}

    @classmethod
    def from_fields(cls, saved: Mapping[str, Any]) -> Reporting | None:
        """What :meth:`fields` saved; None where a file lacks it (runs of older versions)."""
        if not all(key in saved for key in ("benchmark", "headline", "families")):
            return None
        return cls(saved["benchmark"], saved["headline"], dict(saved["families"]))


def extent_settings(task_config: Mapping[str, Any]) -> frozenset[str]:
    """The settings of the task a config describes that only count its examples (its class's
    ``EXTENT_SETTINGS``, see :class:`Task`), and ``max_examples``, which caps every task."""
    try:
        cls = get_class(task_config["_target_"])
    except Exception:  # a folder of a task class that no longer exists: every setting counts
        return frozenset({"max_examples"})
    return frozenset({"max_examples", *getattr(cls, "EXTENT_SETTINGS", ())})


def task_reporting(task_config: Mapping[str, Any]) -> Reporting:
    """The :class:`Reporting` of the task a config describes (the ``task`` section of a run's
    config), asked of its ``_target_`` class without building the task (no data is read)."""
    target = task_config["_target_"]
    reporting = getattr(get_class(target), "reporting", None)
    if reporting is None:
        raise ValueError(
            f"The task class {target} does not say how its scores are reported; give it a "
            "classmethod reporting(config) -> capkv.tasks.base.Reporting."
        )
    return reporting(task_config)


class Task(Protocol):
    """A task yields examples and scores predictions; one task = one results directory.

    A task class also says how its scores are reported (:class:`Reporting`) from its config
    alone, so that results folders of any age can be tabled.

    Optional: ``shares_contexts() -> bool``, whether some context of the task is asked several
    questions, i.e. several examples carry the identical ``context`` text (yielded one after the
    other, in asking order, where the task can). The ``shared_context`` protocols group the
    examples by identical context, prefill and compress each once and ask its questions in turn;
    :func:`shares_contexts` reads it (False for a task without the method), and
    :data:`SHARED_CONTEXT_TASKS` lists the tasks that can.

    Optional: a class attribute ``EXTENT_SETTINGS``, the names of the task's settings that only
    say how many examples it has, each example being the same whatever their value (RULER's
    ``num_examples``: example ``i`` is drawn from its seed and index alone). A results folder
    written with another value of them is extended, not refused (:func:`extent_settings`).
    """

    name: str

    @classmethod
    def reporting(cls, config: Mapping[str, Any]) -> Reporting:
        """Benchmark, headline score and subtask families of the task ``config`` builds."""
        ...

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

    def shares_contexts(self) -> bool:
        """The capped task's answer (the cap may keep only some questions of a context)."""
        return shares_contexts(self.task)

    @property
    def evaluate(self) -> Callable[..., Any]:
        """The task's own ``evaluate`` (a reading task, :func:`capkv.harness.runner.example_row`);
        AttributeError for a task that answers questions."""
        return self.task.evaluate


# The tasks some of whose contexts are asked several questions, for the shared_context protocols'
# refusal of a task that has none.
SHARED_CONTEXT_TASKS = (
    "task=needle with task.num_needles>1, task=ruler with task.num_questions>1 (its niah "
    "subtasks), task=longbench or longbench_e (records sharing a context), task=custom"
)


def shares_contexts(task: Any) -> bool:
    """Whether some context of ``task`` is asked several questions: its ``shares_contexts()``,
    False where it has none (see :class:`Task`)."""
    method = getattr(task, "shares_contexts", None)
    return bool(method()) if callable(method) else False


def capped(task: Task, max_examples: int | None) -> Task:
    """``task`` limited to ``max_examples`` examples per subtask (itself when None)."""
    return task if max_examples is None else CappedTask(task, max_examples)
