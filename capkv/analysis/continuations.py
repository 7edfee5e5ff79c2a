"""How closely one greedy continuation follows another, token by token.

Two measures of a continuation against a reference (the full cache's continuation of the same
prompt), both on token ids, so no tokenizer or text normalisation is involved:

- :func:`first_divergence`: the tokens identical before the first one that differs;
- :func:`rouge_l`: ROUGE-L F1 (Lin 2004), from the longest common subsequence of the two token
  sequences; it keeps crediting a continuation that drifts and comes back, where the first
  divergence stops counting.
"""

from __future__ import annotations

from collections.abc import Sequence


def first_divergence(reference: Sequence[int], candidate: Sequence[int]) -> int:
    """Index of the first token where ``candidate`` differs from ``reference``.

    That is the number of leading tokens the two share; when one is a prefix of the other (or
    they are equal), the length of the shorter.
    """
    for index, (expected, token) in enumerate(zip(reference, candidate, strict=False)):
        if expected != token:
            return index
    return min(len(reference), len(candidate))


def lcs_length(first: Sequence[int], second: Sequence[int]) -> int:
    """Length of a longest common subsequence (not necessarily contiguous) of two sequences.

    The textbook dynamic programme, one row at a time: time ``len(first) x len(second)``,
    memory ``len(second)``.
    """
    previous = [0] * (len(second) + 1)
    for item in first:
        current = [0]
        for j, other in enumerate(second):
            if item == other:
                current.append(previous[j] + 1)
            else:
                current.append(max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(reference: Sequence[int], candidate: Sequence[int]) -> float:
    """ROUGE-L F1 of ``candidate`` against ``reference`` on tokens.

    With ``L`` the length of their longest common subsequence, precision ``L / len(candidate)``,
    recall ``L / len(reference)`` and F1 their harmonic mean, in [0, 1]: 1 for equal sequences
    (two empty ones included), 0 when they share no token or exactly one is empty.
    """
    if not reference and not candidate:
        return 1.0
    common = lcs_length(reference, candidate)
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate), common / len(reference)
    return 2 * precision * recall / (precision + recall)
