"""The LongBench task and any JSONL file in its schema, as tasks the runner runs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capkv.tasks.base import Example, Reporting
from capkv.tasks.longbench.data import check_jsonl, load_hub, read_jsonl
from capkv.tasks.longbench.metrics import METRICS, best_score, first_line, score_prediction
from capkv.tasks.longbench.prompts import PROMPT_FORMATS, PromptFormat, build_example
from capkv.tasks.longbench.settings import DATASETS, FAMILIES

HEADLINE = "score"


def _check_limit(max_examples: int | None) -> None:
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be a positive integer or None, got {max_examples}.")


@dataclass
class LongBench:
    """LongBench's 16 English and code datasets (Bai et al. 2023, arXiv 2308.14508).

    Single- and multi-document QA, summarisation, few-shot learning, synthetic counting and
    retrieval, and code completion over long inputs; each dataset has its official prompt,
    generation length, metric and family (``datasets.json``, :mod:`~capkv.tasks.longbench.metrics`).

    Attributes
    ----------
    datasets : list[str]
        Datasets to run, a subset of :data:`DATASETS` (default: all 16).
    data_dir : str or None
        Folder holding the official ``<dataset>.jsonl`` files (from LongBench's ``data.zip``).
        When None, datasets are loaded from the hub with
        ``datasets.load_dataset("THUDM/LongBench", name, split="test")``.
    max_examples : int or None
        Use only the first this many examples of each dataset (None: all).
    name : str
        Task name (results directory).
    """

    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    data_dir: str | None = None
    max_examples: int | None = None
    name: str = "longbench"

    def __post_init__(self) -> None:
        if isinstance(self.datasets, str):
            self.datasets = [self.datasets]
        self.datasets = list(self.datasets)
        unknown = [name for name in self.datasets if name not in PROMPT_FORMATS]
        if unknown:
            raise ValueError(
                f"Unknown LongBench dataset(s) {unknown}; choose from {list(DATASETS)}."
            )
        _check_limit(self.max_examples)
        if self.data_dir is not None:
            self._check_data_dir(Path(self.data_dir))

    @classmethod
    def reporting(cls, config: Mapping[str, Any]) -> Reporting:
        """LongBench's score and each dataset's family (the paper's six groups)."""
        datasets = config.get("datasets", DATASETS)
        datasets = [datasets] if isinstance(datasets, str) else datasets
        return Reporting("longbench", HEADLINE, {name: FAMILIES[name] for name in datasets})

    def _check_data_dir(self, folder: Path) -> None:
        if not folder.is_dir():
            raise ValueError(
                f"data_dir {str(folder)!r} is not a folder; pass task.data_dir=<folder of "
                "official LongBench JSONL files>, or task.data_dir=null to load from the hub."
            )
        for name in self.datasets:
            if not (folder / f"{name}.jsonl").is_file():
                raise ValueError(
                    f"{name}.jsonl was not found in data_dir {str(folder.resolve())!r}; put the "
                    "official LongBench JSONL files there or drop the dataset from task.datasets."
                )
            check_jsonl(folder / f"{name}.jsonl", self.max_examples)

    def _records(self, name: str) -> Iterable[dict[str, Any]]:
        if self.data_dir is None:
            return load_hub(name, self.max_examples)
        return read_jsonl(Path(self.data_dir) / f"{name}.jsonl", self.max_examples)

    def examples(self, tokenizer: Any, max_prompt_tokens: int) -> Iterator[Example]:
        """Yield the examples of every selected dataset, prompts fitted to the token budget.

        Parameters
        ----------
        tokenizer : Any
            The model's tokenizer.
        max_prompt_tokens : int
            Budget for the prompt text (context + question), without special tokens.

        Yields
        ------
        Example
            ``example_id`` is ``"<dataset>/<_id>"``; metadata holds ``subtask``,
            ``all_classes`` and ``length``.
        """
        for name in self.datasets:
            fmt = PROMPT_FORMATS[name]
            for index, record in enumerate(self._records(name)):
                example_id = f"{name}/{record.get('_id', index)}"
                yield build_example(example_id, record, fmt, name, tokenizer, max_prompt_tokens)

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        """Official LongBench score of one prediction (see :func:`score_prediction`).

        Parameters
        ----------
        prediction : str
            Model output.
        example : Example
            The example it answers.

        Returns
        -------
        dict[str, float]
            ``{"score": value in [0, 1]}``.
        """
        metadata = example.metadata
        value = score_prediction(
            metadata["subtask"], prediction, example.answers, metadata["all_classes"]
        )
        return {"score": value}


@dataclass
class CustomJsonlTask:
    """Any JSONL file in the LongBench schema, scored with one of the LongBench metrics.

    Each line holds ``input``, ``context``, ``answers`` (list) and optionally ``all_classes`` and
    ``_id``. Prompts are built, split and truncated as for :class:`LongBench`.

    Attributes
    ----------
    path : str
        The JSONL file.
    metric : str
        Name of a metric in :data:`capkv.tasks.longbench.metrics.METRICS`.
    template : str
        Prompt with ``{context}`` once and ``{input}`` at most once; the example's context is the
        template up to and including ``{context}``. If ``{input}`` comes before ``{context}`` it
        therefore lands in the context part.
    max_new_tokens : int
        Greedy decoding length.
    use_chat_template : bool
        Wrap the prompt in the model's chat template.
    first_line_only : bool
        Score only the first line of the prediction (LongBench does so for few-shot datasets).
    max_examples : int or None
        Use only the first this many lines (None: all).
    name : str
        Task name (results directory); also the ``subtask`` of every example.
    """

    path: str
    metric: str
    template: str
    max_new_tokens: int
    use_chat_template: bool = True
    first_line_only: bool = False
    max_examples: int | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"Unknown metric {self.metric!r}; choose from {list(METRICS)}.")
        if not Path(self.path).is_file():
            raise ValueError(
                f"JSONL file {str(Path(self.path).resolve())!r} does not exist; set task.path to "
                "a JSONL file with input, context and answers fields."
            )
        _check_limit(self.max_examples)
        if self.max_new_tokens < 1:
            raise ValueError(
                f"max_new_tokens must be a positive number of tokens, got {self.max_new_tokens}; "
                "pass e.g. task.max_new_tokens=64."
            )
        check_jsonl(Path(self.path), self.max_examples)
        self._format = PromptFormat(self.template, self.max_new_tokens, self.use_chat_template)

    @classmethod
    def reporting(cls, config: Mapping[str, Any]) -> Reporting:
        """One score, no families: the file is its own subtask."""
        return Reporting("custom", HEADLINE)

    def examples(self, tokenizer: Any, max_prompt_tokens: int) -> Iterator[Example]:
        """Yield one example per line, prompts fitted to the token budget.

        Parameters
        ----------
        tokenizer : Any
            The model's tokenizer.
        max_prompt_tokens : int
            Budget for the prompt text (context + question), without special tokens.

        Yields
        ------
        Example
            ``example_id`` is ``"<name>/<_id>"`` (the line index when ``_id`` is absent).
        """
        records = read_jsonl(Path(self.path), self.max_examples)
        for index, record in enumerate(records):
            example_id = f"{self.name}/{record.get('_id', index)}"
            yield build_example(
                example_id, record, self._format, self.name, tokenizer, max_prompt_tokens
            )

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        """Best score of the chosen metric over the reference answers.

        Parameters
        ----------
        prediction : str
            Model output.
        example : Example
            The example it answers.

        Returns
        -------
        dict[str, float]
            ``{"score": value in [0, 1]}``.
        """
        if self.first_line_only:
            prediction = first_line(prediction)
        metric = METRICS[self.metric]
        value = best_score(metric, prediction, example.answers, example.metadata["all_classes"])
        return {"score": value}
