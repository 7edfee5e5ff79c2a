"""Comparing a continuation with the full cache's: first divergence and ROUGE-L on tokens."""

from __future__ import annotations

import pytest

from capkv.analysis.continuations import first_divergence, lcs_length, rouge_l


@pytest.mark.parametrize(
    ("reference", "candidate", "expected"),
    [
        ([5, 6, 7, 8], [5, 6, 7, 8], 4),  # equal: every token
        ([5, 6, 7, 8], [5, 6, 9, 8], 2),  # differs at index 2, agrees again after
        ([5, 6, 7, 8], [9, 6, 7, 8], 0),  # differs at once
        ([5, 6, 7, 8], [5, 6], 2),  # a prefix: the shorter length
        ([5, 6], [5, 6, 7], 2),
        ([], [1], 0),
    ],
)
def test_first_divergence_counts_the_tokens_identical_before_the_first_difference(
    reference, candidate, expected
):
    assert first_divergence(reference, candidate) == expected


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        # The textbook pair ABCBDAB / BDCABA (Cormen et al.), whose LCS (e.g. BCBA) has 4 items.
        ([1, 2, 3, 2, 4, 1, 2], [2, 4, 3, 1, 2, 1], 4),
        ([1, 2, 3], [1, 2, 3], 3),
        ([1, 2, 3], [4, 5, 6], 0),
        ([1, 2, 3], [3, 2, 1], 1),  # order matters
        ([], [1, 2], 0),
        ([7, 7, 7], [7, 7], 2),  # repeats are matched once each
    ],
)
def test_lcs_length_of_hand_made_sequences(first, second, expected):
    assert lcs_length(first, second) == expected
    assert lcs_length(second, first) == expected


def test_rouge_l_is_the_f1_of_the_lcs_over_both_lengths():
    # LCS of [1, 2, 3, 4] and [1, 3, 5] is [1, 3]: precision 2/3, recall 2/4, F1 = 4/7.
    assert rouge_l([1, 2, 3, 4], [1, 3, 5]) == pytest.approx(4 / 7)
    assert rouge_l([1, 3, 5], [1, 2, 3, 4]) == pytest.approx(4 / 7)
    # A continuation that drifts and comes back keeps most of its credit.
    assert rouge_l([1, 2, 3, 4, 5, 6], [1, 9, 3, 4, 5, 6]) == pytest.approx(5 / 6)


@pytest.mark.parametrize(
    ("reference", "candidate", "expected"),
    [([1, 2], [1, 2], 1.0), ([], [], 1.0), ([1, 2], [3, 4], 0.0), ([1], [], 0.0), ([], [1], 0.0)],
)
def test_rouge_l_at_its_ends(reference, candidate, expected):
    assert rouge_l(reference, candidate) == expected
