"""The LongBench task and any JSONL file in its schema, as tasks the runner runs."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capkv.tasks.base import Example, Reporting
from capkv.tasks.longbench.data import check_jsonl, read_jsonl
from capkv.tasks.longbench.hub import HUB_REPO, hub_data_dir
from capkv.tasks.longbench.metrics import METRICS, best_score, first_line, score_prediction
from capkv.tasks.longbench.prompts import PROMPT_FORMATS, PromptFormat, build_example
from capkv.tasks.longbench.settings import (
    DATASETS,
    E_DATASETS,
    E_SUFFIX,
    FAMILIES,
    STANDARD,
    VARIANTS,
    E,
    length_bucket,
)

HEADLINE = "score"
BENCHMARK, BENCHMARK_E = "longbench", "longbench_e"


def _check_limit(max_examples: int | None) -> None:
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be a positive integer or None, got {max_examples}.")


@dataclass
class LongBench:
    """LongBench's 16 English and code datasets (Bai et al. 2023, arXiv 2308.14508), or
    LongBench-E, 13 of them with lengths spread evenly over 0-4k, 4-8k and 8k+ words.

    Single- and multi-document QA, summarisation, few-shot learning, synthetic counting and
    retrieval, and code completion over long inputs; each dataset has its official prompt,
    generation length, metric and family (``datasets.json``, :mod:`~capkv.tasks.longbench.metrics`).

    Attributes
    ----------
    datasets : list[str] or None
        Datasets to run, a subset of :data:`DATASETS` (LongBench-E: of :data:`E_DATASETS`);
        None: all of the variant.
    data_dir : str or None
        Folder holding the official ``<dataset>.jsonl`` files (``<dataset>_e.jsonl`` for
        LongBench-E), e.g. ``data/`` of LongBench's ``data.zip`` unpacked. When None, ``data.zip``
        of ``hub_repo`` is downloaded and unpacked once into the project's cache
        (:mod:`~capkv.tasks.longbench.hub`) and read from there.
    hub_repo : str
        Hugging Face dataset repository holding ``data.zip`` (default the official one).
    variant : str
        ``"standard"`` (LongBench) or ``"e"`` (LongBench-E: examples carry their length bucket,
        ``metadata["length_bucket"]``, for per-bucket scores).
    max_length : int or None
        Cut prompts to this many tokens, as ``pred.py`` does with ``model2maxlen.json`` (e.g.
        7950 for an 8k model in the PyramidKV and SnapKV evaluations); None, or a value above
        the model's prompt limit: that limit (the window less room for the answer and template).
    max_examples : int or None
        Use only the first this many examples of each dataset (None: all).
    name : str or None
        Task name (results directory); None: ``longbench`` or ``longbench_e``.
    """

    datasets: list[str] | None = None
    data_dir: str | None = None
    hub_repo: str = HUB_REPO
    variant: str = STANDARD
    max_length: int | None = None
    max_examples: int | None = None
    name: str | None = None
    _folder: Path = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_variant(self.variant)
        self.datasets = variant_datasets(self.variant, self.datasets)
        self.name = self.name or task_name(self.variant)
        _check_limit(self.max_examples)
        if self.max_length is not None and (
            not isinstance(self.max_length, int)
            or isinstance(self.max_length, bool)
            or self.max_length < 2
        ):
            raise ValueError(
                f"task.max_length={self.max_length!r} is not a number of tokens of at least 2; "
                "pass e.g. task.max_length=7950, or task.max_length=null for the model's limit."
            )
        files = [self.file_name(name) for name in self.datasets]
        if self.data_dir is None:
            self._folder = hub_data_dir(self.hub_repo, files)
        else:
            self._folder = Path(self.data_dir)
        self._check_folder(self._folder)

    @classmethod
    def reporting(cls, config: Mapping[str, Any]) -> Reporting:
        """LongBench's score and each dataset's family (the paper's six groups)."""
        variant = config.get("variant", STANDARD)
        check_variant(variant)
        datasets = variant_datasets(variant, config.get("datasets"))
        benchmark = BENCHMARK_E if variant == E else BENCHMARK
        return Reporting(benchmark, HEADLINE, {name: FAMILIES[name] for name in datasets})

    def file_name(self, dataset: str) -> str:
        """The JSONL file of ``dataset`` in this variant, e.g. ``qasper_e.jsonl``."""
        return f"{dataset}{E_SUFFIX if self.variant == E else ''}.jsonl"

    def _check_folder(self, folder: Path) -> None:
        if not folder.is_dir():
            raise ValueError(
                f"data_dir {str(folder)!r} is not a folder; pass task.data_dir=<folder of "
                "official LongBench JSONL files>, or task.data_dir=null to load from the hub."
            )
        for name in self.datasets or ():
            path = folder / self.file_name(name)
            if not path.is_file():
                raise ValueError(
                    f"{path.name} was not found in data_dir {str(folder.resolve())!r}; put the "
                    "official LongBench JSONL files there or drop the dataset from task.datasets."
                )
            if self.variant == E:  # every record checked, and its length too, before any model
                for index, record in enumerate(read_jsonl(path, self.max_examples)):
                    bucket_of(record, path, index)
            else:
                check_jsonl(path, self.max_examples)

    def examples(self, tokenizer: Any, max_prompt_tokens: int) -> Iterator[Example]:
        """Yield the examples of every selected dataset, prompts cut to the model's limit.

        Parameters
        ----------
        tokenizer : Any
            The model's tokenizer.
        max_prompt_tokens : int
            The model's prompt limit; prompts are cut to it or to ``max_length``, the smaller
            (``pred.py``'s ``max_length``).

        Yields
        ------
        Example
            ``example_id`` is ``"<dataset>/<_id>"``; metadata holds ``subtask`` (the dataset),
            ``all_classes``, ``length`` and, for LongBench-E, ``length_bucket``.
        """
        limit = min(max_prompt_tokens, self.max_length or max_prompt_tokens)
        for name in self.datasets or ():
            fmt = PROMPT_FORMATS[name]
            path = self._folder / self.file_name(name)
            for index, record, example in file_examples(
                path, name, fmt, tokenizer, limit, self.max_examples
            ):
                if self.variant == E:
                    example.metadata["length_bucket"] = bucket_of(record, path, index)
                yield example

    def shares_contexts(self) -> bool:
        """True: records may share a context (see :func:`file_examples`)."""
        return True

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


def file_examples(
    path: Path,
    subtask: str,
    fmt: PromptFormat,
    tokenizer: Any,
    max_prompt_tokens: int,
    max_examples: int | None,
) -> Iterator[tuple[int, dict[str, Any], Example]]:
    """The examples of one JSONL file in LongBench's schema, with each record and its line index:
    ``example_id`` is ``"<subtask>/<_id>"`` (the line index when ``_id`` is absent).

    Records are yielded in file order. Records that share a context (narrativeqa asks several
    questions of a story; a LongBench-E file may hold one context at several places) give
    examples with the identical ``context`` text, hence identical context ids, wherever they
    sit in the file, not necessarily one after the other: the ``shared_context`` protocols group
    the examples by identical context over the whole task, in order of first appearance. A
    prompt cut in the middle to the limit loses that: its context part ends with the kept tail,
    which depends on the question's length, so such records are then asked apart.
    """
    for index, record in enumerate(read_jsonl(path, max_examples)):
        example_id = f"{subtask}/{record.get('_id', index)}"
        yield (
            index,
            record,
            build_example(example_id, record, fmt, subtask, tokenizer, max_prompt_tokens),
        )


def check_variant(variant: Any) -> None:
    """Refuse, in one line, a ``task.variant`` other than ``standard`` or ``e``."""
    if variant not in VARIANTS:
        raise ValueError(
            f"task.variant={variant!r} is not a LongBench variant; choose task.variant=standard "
            "(LongBench) or task.variant=e (LongBench-E)."
        )


def variant_datasets(variant: str, datasets: Any) -> list[str]:
    """The datasets a LongBench run reads: ``datasets`` checked against the variant's, or all.

    Parameters
    ----------
    variant : str
        ``"standard"`` or ``"e"``.
    datasets : list[str], str or None
        The asked datasets (one name as a string; None: all of the variant).

    Returns
    -------
    list[str]
        Dataset names, in the order given.

    Raises
    ------
    ValueError
        If a name is not a dataset of the variant.
    """
    valid = E_DATASETS if variant == E else DATASETS
    if datasets is None:
        return list(valid)
    names = [datasets] if isinstance(datasets, str) else list(datasets)
    unknown = [name for name in names if name not in valid]
    if unknown:
        which = "LongBench-E" if variant == E else "LongBench"
        raise ValueError(f"Unknown {which} dataset(s) {unknown}; choose from {list(valid)}.")
    return names


def task_name(variant: str) -> str:
    """Default task name (results directory) of a variant."""
    return BENCHMARK_E if variant == E else BENCHMARK


def bucket_of(record: dict[str, Any], path: Path, index: int) -> str:
    """The length bucket of a LongBench-E record, from its ``length`` field."""
    length = record.get("length")
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise ValueError(
            f"record {index} of {path} has length={length!r}, not a count of words; LongBench-E "
            "sorts records into length buckets by it, so give every record its length."
        )
    return length_bucket(length)


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
        examples = file_examples(
            Path(self.path),
            self.name,
            self._format,
            tokenizer,
            max_prompt_tokens,
            self.max_examples,
        )
        for _, _, example in examples:
            yield example

    def shares_contexts(self) -> bool:
        """True: the file's records may share a context (see :func:`file_examples`)."""
        return True

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
