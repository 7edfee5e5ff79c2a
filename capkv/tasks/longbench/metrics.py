"""LongBench metrics, reimplemented from the official evaluation code.

LongBench (Bai et al. 2023, "LongBench: A Bilingual, Multitask Benchmark for Long Context
Understanding", arXiv 2308.14508) scores each English dataset with one of six metrics
(``metrics.py`` and ``eval.py`` of THUDM/LongBench). This module reproduces them without the
``rouge`` and ``fuzzywuzzy`` packages; the Chinese metrics (jieba-based) are not included.

Differences from the official code, all in corner cases:

- ``rouge_score``: the ``rouge`` package (1.0.1) back-traces its LCS recursively, so a sentence
  pair longer than about 1000 words raises ``RecursionError``, which the official bare ``except``
  turns into a score of 0. Ours is iterative and scores such pairs normally.
- ``code_sim_score``: ``fuzzywuzzy.fuzz.ratio`` uses ``python-Levenshtein`` when it is installed
  and :class:`difflib.SequenceMatcher` otherwise; we always use the difflib ratio (the pure-python
  fallback), which can differ from the Levenshtein ratio by a point or two on some strings.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial

from capkv.tasks.common import normalize_text
from capkv.tasks.longbench.settings import SETTINGS

# Metric(prediction, ground_truth) -> score in [0, 1].
Metric = Callable[[str, str], float]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"\d+")
_PARAGRAPH = re.compile(r"Paragraph (\d+)")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, and collapse whitespace.

    :func:`~capkv.tasks.common.normalize_text`, then the articles. The same result as
    LongBench's ``normalize_answer`` (Bai et al. 2023,
    arXiv 2308.14508), itself taken from the SQuAD evaluation script.

    Parameters
    ----------
    text : str
        Raw answer text.

    Returns
    -------
    str
        Normalised text, tokens separated by single spaces.
    """
    return " ".join(_ARTICLES.sub(" ", normalize_text(text)).split())


def first_line(prediction: str) -> str:
    """First line of a prediction after leading newlines, as LongBench's ``eval.py`` takes it.

    Parameters
    ----------
    prediction : str
        Model output.

    Returns
    -------
    str
        ``prediction.lstrip("\\n").split("\\n")[0]``.
    """
    return prediction.lstrip("\n").split("\n")[0]


def qa_f1_score(prediction: str, ground_truth: str) -> float:
    """Token-level F1 between the normalised prediction and reference.

    LongBench's ``qa_f1_score`` (Bai et al. 2023, arXiv 2308.14508): both texts go through
    :func:`normalize_answer`, are split on whitespace, and the overlap is the multiset
    intersection of the tokens; F1 = 2PR / (P + R), 0 when nothing overlaps.

    Parameters
    ----------
    prediction : str
        Model output.
    ground_truth : str
        One reference answer.

    Returns
    -------
    float
        F1 in [0, 1].
    """
    pred_tokens = normalize_answer(prediction).split()
    true_tokens = normalize_answer(ground_truth).split()
    overlap = sum((Counter(pred_tokens) & Counter(true_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(true_tokens)
    return 2 * precision * recall / (precision + recall)


def _rouge_sentences(text: str) -> list[list[str]]:
    """Split text the way the ``rouge`` package does: on ".", then on single spaces.

    Pieces between periods that are empty are dropped; whitespace inside a piece is collapsed to
    single spaces, so a whitespace-only piece becomes the one-word sentence ``[""]`` (kept, as
    the package keeps it).
    """
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if piece]


def _lcs_words(reference: list[str], candidate: list[str]) -> set[str]:
    """Words of one longest common subsequence, as the ``rouge`` package back-traces it.

    The package keeps the LCS as a set of words, so which LCS is chosen matters; ties are broken
    as it does (step back in the reference only when that keeps a strictly longer LCS).
    """
    n, m = len(reference), len(candidate)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            if reference[i - 1] == candidate[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    words: set[str] = set()
    i, j = n, m
    while i > 0 and j > 0:
        if reference[i - 1] == candidate[j - 1]:
            words.add(reference[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_score(prediction: str, ground_truth: str) -> float:
    """ROUGE-L F-measure as the ``rouge`` PyPI package (1.0.1) computes it.

    LongBench (Bai et al. 2023, arXiv 2308.14508) scores summaries with
    ``Rouge().get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"]`` and 0 on any
    error. That package computes the summary-level ROUGE-L of Lin (2004) over sentences split on
    "." and words split on whitespace, with sets of words ("exclusive" mode, its default):

    - n, m: numbers of distinct words in the prediction and in the reference;
    - overlap: number of distinct words in the union, over every (reference sentence,
      prediction sentence) pair, of the words of their LCS;
    - P = overlap / n, R = overlap / m, F = 2PR / (P + R + 1e-8).

    No lower-casing or punctuation removal is applied (other than splitting on "."). An empty
    prediction or reference (no sentence left) scores 0, as the official code's error path does.

    Parameters
    ----------
    prediction : str
        Model output.
    ground_truth : str
        One reference summary.

    Returns
    -------
    float
        ROUGE-L F in [0, 1].
    """
    candidate = _rouge_sentences(prediction)
    reference = _rouge_sentences(ground_truth)
    if not candidate or not reference:
        return 0.0
    n = len({word for sentence in candidate for word in sentence})
    m = len({word for sentence in reference for word in sentence})
    union: set[str] = set()
    for ref_sentence in reference:
        for cand_sentence in candidate:
            union |= _lcs_words(ref_sentence, cand_sentence)
    precision, recall = len(union) / n, len(union) / m
    return 2.0 * precision * recall / (precision + recall + 1e-8)


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str]) -> float:
    """Share of the class names found in the prediction that is the right one.

    LongBench's ``classification_score`` (Bai et al. 2023, arXiv 2308.14508): collect every class
    name that occurs as a substring of the prediction; drop a match that is a proper substring of
    the ground truth (e.g. "Date" when the answer is "Date of birth"); the score is
    ``1 / len(matches)`` when the ground truth is among the matches, else 0.

    The official code drops matches while iterating over the same list, so the match that follows
    a dropped one is never examined and always kept. We reproduce that so that scores agree.

    Parameters
    ----------
    prediction : str
        Model output (first line only, see :func:`score_prediction`).
    ground_truth : str
        The correct class name.
    all_classes : Sequence[str]
        Every class name of the dataset.

    Returns
    -------
    float
        Score in [0, 1].
    """
    found = [name for name in all_classes if name in prediction]
    kept: list[str] = []
    skip_next = False
    for name in found:
        if skip_next:
            kept.append(name)
            skip_next = False
        elif name in ground_truth and name != ground_truth:
            skip_next = True
        else:
            kept.append(name)
    return 1.0 / len(kept) if ground_truth in kept else 0.0


def _share_equal(prediction: str, target: str) -> float:
    """Fraction of the numbers in ``prediction`` that equal ``target`` (0 if there are none)."""
    numbers = _NUMBER.findall(prediction)
    if not numbers:
        return 0.0
    return sum(number == target for number in numbers) / len(numbers)


def count_score(prediction: str, ground_truth: str) -> float:
    """Fraction of the numbers in the prediction that equal the true count.

    LongBench's ``count_score`` (Bai et al. 2023, arXiv 2308.14508) for ``passage_count``: every
    run of digits in the prediction is a guess; the score is right guesses / guesses.

    Parameters
    ----------
    prediction : str
        Model output.
    ground_truth : str
        The count, as digits.

    Returns
    -------
    float
        Score in [0, 1].
    """
    return _share_equal(prediction, ground_truth)


def retrieval_score(prediction: str, ground_truth: str) -> float:
    """Fraction of the numbers in the prediction that equal the true paragraph number.

    LongBench's ``retrieval_score`` (Bai et al. 2023, arXiv 2308.14508) for
    ``passage_retrieval_en``: the target is the first ``Paragraph (\\d+)`` in the ground truth;
    every run of digits in the prediction is a guess; the score is right guesses / guesses.

    Parameters
    ----------
    prediction : str
        Model output, e.g. "Paragraph 12".
    ground_truth : str
        Reference of the form "Paragraph <n>".

    Returns
    -------
    float
        Score in [0, 1].

    Raises
    ------
    ValueError
        If the ground truth holds no "Paragraph <n>".
    """
    match = _PARAGRAPH.search(ground_truth)
    if match is None:
        raise ValueError(
            f"retrieval_score needs a ground truth like 'Paragraph 3', got {ground_truth!r}; "
            "use this metric only with passage-retrieval references."
        )
    return _share_equal(prediction, match.group(1))


def _fuzz_ratio(first: str, second: str) -> int:
    """``fuzzywuzzy.fuzz.ratio`` with its pure-python (difflib) backend: 0-100, rounded."""
    if first == second:
        return 100
    if not first or not second:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, first, second).ratio()))


def code_sim_score(prediction: str, ground_truth: str) -> float:
    """Edit similarity between the first code line of the prediction and the reference line.

    LongBench's ``code_sim_score`` (Bai et al. 2023, arXiv 2308.14508) for ``lcc`` and
    ``repobench-p``: after stripping leading newlines, take the first line that contains none of
    "`", "#" or "//" (the empty string if there is none) and return ``fuzz.ratio(line,
    ground_truth) / 100``. ``fuzz.ratio`` is 100 for equal strings, 0 if either is empty, else
    ``round(100 * difflib.SequenceMatcher(None, a, b).ratio())`` (fuzzywuzzy's pure-python
    backend; the official runs may have used python-Levenshtein's ratio instead).

    Parameters
    ----------
    prediction : str
        Model output.
    ground_truth : str
        The next line of code.

    Returns
    -------
    float
        Similarity in [0, 1], in steps of 0.01.
    """
    lines = prediction.lstrip("\n").split("\n")
    code_line = next(
        (line for line in lines if "`" not in line and "#" not in line and "//" not in line), ""
    )
    return _fuzz_ratio(code_line, ground_truth) / 100


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1_score": qa_f1_score,
    "rouge_score": rouge_score,
    "classification_score": classification_score,
    "retrieval_score": retrieval_score,
    "count_score": count_score,
    "code_sim_score": code_sim_score,
}

# Each dataset's metric and first-line rule, from its settings (``datasets.json``).
DATASET_METRIC: dict[str, Callable[..., float]] = {
    name: METRICS[settings.metric] for name, settings in SETTINGS.items()
}
FIRST_LINE_DATASETS = frozenset(name for name, s in SETTINGS.items() if s.first_line_only)


def bind_metric(metric: Callable[..., float], all_classes: Sequence[str] | None) -> Metric:
    """Give a metric the class names it needs, so that every metric takes (prediction, truth).

    Parameters
    ----------
    metric : Callable
        One of :data:`METRICS`.
    all_classes : Sequence[str] or None
        Class names of the dataset (used by :func:`classification_score` only).

    Returns
    -------
    Metric
        A function of (prediction, ground_truth).

    Raises
    ------
    ValueError
        If the metric is :func:`classification_score` and no class names are given.
    """
    if metric is not classification_score:
        return metric
    if not all_classes:
        raise ValueError(
            "classification_score needs the dataset's class names; give every record an "
            "'all_classes' list."
        )
    return partial(classification_score, all_classes=all_classes)


def best_score(
    metric: Callable[..., float],
    prediction: str,
    answers: Sequence[str],
    all_classes: Sequence[str] | None = None,
) -> float:
    """Maximum of a metric over the reference answers, as LongBench's ``scorer`` takes it.

    Parameters
    ----------
    metric : Callable
        One of :data:`METRICS`.
    prediction : str
        Model output, already post-processed.
    answers : Sequence[str]
        Reference answers.
    all_classes : Sequence[str] or None
        Class names, for :func:`classification_score`.

    Returns
    -------
    float
        Best score in [0, 1]; 0 when there are no answers.
    """
    bound = bind_metric(metric, all_classes)
    return max((bound(prediction, answer) for answer in answers), default=0.0)


def score_prediction(
    dataset: str,
    prediction: str,
    answers: Sequence[str],
    all_classes: Sequence[str] | None = None,
) -> float:
    """Score one prediction the way LongBench's ``eval.py`` does.

    For trec, triviaqa, samsum (and lsht) only the first line of the prediction is kept; the
    score is the maximum of the dataset's metric over the reference answers (Bai et al. 2023,
    arXiv 2308.14508). The paper reports the mean over examples times 100.

    Parameters
    ----------
    dataset : str
        One of the 16 English LongBench datasets (keys of :data:`DATASET_METRIC`).
    prediction : str
        Model output.
    answers : Sequence[str]
        Reference answers.
    all_classes : Sequence[str] or None
        Class names (trec only).

    Returns
    -------
    float
        Score in [0, 1].

    Raises
    ------
    ValueError
        If the dataset is not one of the 16 English datasets.
    """
    if dataset not in DATASET_METRIC:
        raise ValueError(
            f"No LongBench metric for dataset {dataset!r}; use one of {sorted(DATASET_METRIC)}."
        )
    if dataset in FIRST_LINE_DATASETS:
        prediction = first_line(prediction)
    return best_score(DATASET_METRIC[dataset], prediction, answers, all_classes)
