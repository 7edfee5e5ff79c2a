"""LongBench's per-dataset settings, read from ``datasets.json`` beside this module.

For each of the 16 English datasets: the official prompt template (verbatim from THUDM/LongBench
``config/dataset2prompt.json``), the generation length (``config/dataset2maxlen.json``), whether
the prompt goes through the chat template (``pred.py``: "chat models are better off without build
prompts on these tasks", the few-shot and code datasets), the metric and whether only the
prediction's first line is scored (``eval.py``), the dataset's family (the paper's table 1), and
whether LongBench-E has it (``pred.py --e``: 13 of the 16, as ``<dataset>_e.jsonl``).

The templates are the official strings character for character, typos included (narrativeqa's
"asconcisely"): the published numbers were made with them.

None of the English templates puts ``{input}`` before ``{context}``. Templates without
``{input}`` (gov_report, multi_news, passage_count, lcc) get a question part made only of the
closing instruction. In repobench-p, ``{input}`` is the in-file code prefix that directly follows
the cross-file context: it goes to the question part, so the context_only protocol leaves it
uncompressed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SETTINGS_FILE = Path(__file__).with_name("datasets.json")


@dataclass(frozen=True)
class DatasetSettings:
    """How one LongBench dataset is prompted, generated and scored.

    Attributes
    ----------
    family : str
        The dataset's family (Single-doc QA, Multi-doc QA, Summarization, Few-shot, Synthetic,
        Code).
    metric : str
        Name of its metric in :data:`capkv.tasks.longbench.metrics.METRICS`.
    max_new_tokens : int
        Greedy decoding length.
    chat_template : bool
        Wrap the prompt in the model's chat template.
    first_line_only : bool
        Score only the prediction's first line.
    in_longbench_e : bool
        LongBench-E holds the dataset (``<dataset>_e.jsonl``).
    template : str
        The prompt, with ``{context}`` once and ``{input}`` at most once.
    """

    family: str
    metric: str
    max_new_tokens: int
    chat_template: bool
    first_line_only: bool
    in_longbench_e: bool
    template: str


SETTINGS: dict[str, DatasetSettings] = {
    name: DatasetSettings(**fields)
    for name, fields in json.loads(SETTINGS_FILE.read_text(encoding="utf-8")).items()
}
DATASETS: tuple[str, ...] = tuple(SETTINGS)
PROMPT_TEMPLATES: dict[str, str] = {name: s.template for name, s in SETTINGS.items()}
MAX_NEW_TOKENS: dict[str, int] = {name: s.max_new_tokens for name, s in SETTINGS.items()}
FAMILIES: dict[str, str] = {name: s.family for name, s in SETTINGS.items()}

# LongBench-E ("--e" of pred.py): the datasets it has, their file suffix, and the length buckets
# eval.py's scorer_e reports, by the record's ``length`` (words of the context): (name, upper bound).
STANDARD, E = "standard", "e"
VARIANTS = (STANDARD, E)
E_DATASETS: tuple[str, ...] = tuple(name for name, s in SETTINGS.items() if s.in_longbench_e)
E_SUFFIX = "_e"
LENGTH_BUCKETS: tuple[tuple[str, float], ...] = (
    ("0-4k", 4000),
    ("4-8k", 8000),
    ("8k+", float("inf")),
)


def length_bucket(length: int) -> str:
    """The LongBench-E bucket of a record's ``length``, as ``eval.py`` sorts it.

    Parameters
    ----------
    length : int
        The record's ``length`` field.

    Returns
    -------
    str
        ``"0-4k"`` below 4000, ``"4-8k"`` below 8000, else ``"8k+"``.
    """
    return next(name for name, bound in LENGTH_BUCKETS if length < bound)
