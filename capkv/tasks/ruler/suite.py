"""The RULER suite: several RULER tasks as one task, each a configuration of its family's class.

Each subtask is a file ``conf/task/ruler/<subtask>.yaml``: the ``_target_`` class of its family
(:mod:`capkv.tasks.ruler.niah`, ``variable_tracking``, ``common_words``, ``frequent_words``) and
the settings that make the variant (``num_keys: 4`` for niah_multikey...). A new variant is a new
file there.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from capkv.tasks.base import Example, Reporting
from capkv.tasks.ruler.base import RulerTask
from capkv.tasks.ruler.niah import check_num_questions

VARIANTS_DIR = Path(__file__).resolve().parents[3] / "conf" / "task" / "ruler"
# The seven subtasks of the suite, in RULER's order (its families: NIAH, tracing, aggregation).
SUBTASKS = (
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
)
HEADLINE = "string_match_all"


def variants() -> list[str]:
    """The subtasks configured under ``conf/task/ruler/``."""
    return sorted(path.stem for path in VARIANTS_DIR.glob("*.yaml"))


def variant_fields(subtask: str) -> set[str]:
    """The settings the class of ``conf/task/ruler/<subtask>.yaml`` has (its dataclass fields)."""
    config = OmegaConf.load(VARIANTS_DIR / f"{subtask}.yaml")
    return {f.name for f in fields(get_class(config._target_))}


def asking_subtasks() -> list[str]:
    """The configured subtasks that can ask a context several questions (``num_questions``)."""
    return [subtask for subtask in variants() if "num_questions" in variant_fields(subtask)]


def ruler_variant(subtask: str, **settings: Any) -> RulerTask:
    """The RULER task of ``conf/task/ruler/<subtask>.yaml``, with ``settings`` (context lengths,
    examples, seed, haystack...) passed where its class has them.

    Raises
    ------
    ValueError
        If no such file exists, or a setting is bad (the subtask's own message).
    """
    path = VARIANTS_DIR / f"{subtask}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown RULER subtasks {[subtask]}; choose from {variants()}")
    config = OmegaConf.load(path)
    accepted = variant_fields(subtask)
    chosen = {key: value for key, value in settings.items() if key in accepted}
    try:
        return instantiate(config, subtask=subtask, name=f"ruler_{subtask}", **chosen)
    except InstantiationException as error:  # a bad setting's own one line, not Hydra's wrapping
        if isinstance(error.__cause__, ValueError):
            raise error.__cause__ from None
        raise


@dataclass
class RulerSuite:
    """Several RULER tasks as one task; scores are reported per ``metadata["subtask"]``.

    Parameters
    ----------
    subtasks : list[str]
        Names of files under ``conf/task/ruler/`` (the seven of :data:`SUBTASKS` by default).
    context_lengths, num_examples, seed :
        Passed to every subtask.
    haystack : str
        Passed to the subtasks that have one (NIAH and variable tracking).
    num_questions : int
        Questions asked of each context (:class:`~capkv.tasks.ruler.niah.NiahTask`), passed to
        the subtasks that have it; more than 1 is refused with a subtask that has not (vt, cwe,
        fwe).
    name : str
        Results directory name.
    """

    subtasks: list[str] = field(default_factory=lambda: list(SUBTASKS))
    context_lengths: list[int] = field(default_factory=lambda: [4096])
    num_examples: int = 20
    seed: int = 42
    haystack: str = "essay"
    num_questions: int = 1
    name: str = "ruler"
    tasks: dict[str, RulerTask] = field(init=False, repr=False)
    EXTENT_SETTINGS: ClassVar[tuple[str, ...]] = RulerTask.EXTENT_SETTINGS

    def __post_init__(self) -> None:
        unknown = sorted(set(self.subtasks) - set(variants()))
        if unknown:
            raise ValueError(f"unknown RULER subtasks {unknown}; choose from {variants()}")
        check_num_questions(self.num_questions)
        asking = asking_subtasks()
        unable = [subtask for subtask in self.subtasks if subtask not in asking]
        if self.num_questions > 1 and unable:
            raise ValueError(
                f"task.num_questions={self.num_questions} asks a context several questions, "
                f"which only RULER's {', '.join(asking)} can; drop {', '.join(unable)} from "
                "task.subtasks or pass task.num_questions=1."
            )
        shared = {
            "context_lengths": list(self.context_lengths),
            "num_examples": self.num_examples,
            "seed": self.seed,
            "haystack": self.haystack,
            "num_questions": self.num_questions,
        }
        self.tasks = {subtask: ruler_variant(subtask, **shared) for subtask in self.subtasks}

    @classmethod
    def reporting(cls, config: Mapping[str, Any]) -> Reporting:
        """RULER's headline (``string_match_all``) and each subtask's family."""
        subtasks = config.get("subtasks", SUBTASKS)
        families = {subtask: ruler_variant(subtask).family for subtask in subtasks}
        return Reporting("ruler", HEADLINE, families)

    def shares_contexts(self) -> bool:
        """Whether a context is asked several questions (``num_questions`` > 1)."""
        return self.num_questions > 1

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
