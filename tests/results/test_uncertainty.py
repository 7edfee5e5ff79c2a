"""Bootstrap intervals and paired comparisons on constructed data with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from capkv.results.uncertainty import compare, headline, mean_interval, sign_flip_p_value


def by_id(scores):
    return {f"e{i}": s for i, s in enumerate(scores)}


def test_constant_scores_have_a_zero_width_interval():
    interval = mean_interval({"": [0.5] * 20})
    assert (interval.mean, interval.low, interval.high, interval.n) == (0.5, 0.5, 0.5, 20)


def test_bernoulli_interval_matches_the_normal_approximation():
    scores = [1.0] * 200 + [0.0] * 200
    interval = mean_interval({"": scores})
    expected = 1.96 * np.sqrt(0.25 / 400)
    assert interval.mean == 0.5
    assert interval.low < 0.5 < interval.high
    assert interval.half_width == pytest.approx(expected, rel=0.15)


def test_the_headline_is_the_mean_of_stratum_means_and_resamples_within_strata():
    strata = {"small": [1.0, 1.0], "large": [0.0] * 50}
    assert headline(strata) == 0.5
    interval = mean_interval(strata)
    # Each stratum is constant, so resampling within strata cannot move the headline.
    assert (interval.low, interval.high) == (0.5, 0.5)
    assert interval.n == 52


def test_the_interval_is_reproducible_and_depends_on_the_seed():
    scores = {"": list(np.random.default_rng(1).random(30))}
    assert mean_interval(scores) == mean_interval(scores)
    assert mean_interval(scores, seed=1) != mean_interval(scores, seed=2)


def test_identical_methods_differ_by_zero_with_p_value_one():
    scores = {"a": by_id([1.0, 0.0, 1.0, 0.5]), "b": by_id([0.2, 0.9])}
    result = compare(scores, scores)
    assert (result.difference.mean, result.difference.low, result.difference.high) == (0, 0, 0)
    assert result.p_value == 1.0
    assert (result.wins, result.losses, result.ties) == (0, 0, 6)
    assert not result.significant


def test_a_method_better_on_every_example_is_significant_though_unpaired_intervals_overlap():
    rng = np.random.default_rng(0)
    base = rng.random(40)  # examples differ far more than the methods do
    b = {"": by_id(base)}
    a = {"": by_id(base + 0.05)}
    unpaired_a, unpaired_b = mean_interval({"": base + 0.05}), mean_interval({"": base})
    assert unpaired_a.low < unpaired_b.high  # the unpaired intervals overlap
    result = compare(a, b)
    assert result.difference.mean == pytest.approx(0.05)
    assert result.difference.low == pytest.approx(0.05)
    assert result.significant
    assert result.p_value < 0.01
    assert (result.wins, result.losses) == (40, 0)


def test_a_noisy_difference_centred_on_zero_is_not_significant():
    rng = np.random.default_rng(3)
    base = rng.random(60)
    noise = rng.normal(0, 0.1, 60)
    noise -= noise.mean()
    result = compare({"": by_id(base + noise)}, {"": by_id(base)})
    assert result.difference.low < 0 < result.difference.high
    assert result.p_value > 0.5


def test_only_examples_both_runs_finished_are_compared():
    a = {"": {"x": 1.0, "y": 1.0, "z": 1.0}}
    b = {"": {"x": 0.0, "y": 0.0}}
    assert compare(a, b).difference.n == 2
    with pytest.raises(ValueError, match="share no example"):
        compare({"": {"x": 1.0}}, {"": {"y": 1.0}})


def test_sign_flip_p_value_is_exact_in_the_limit_for_all_equal_differences():
    # All of 8 differences positive: only 2 of 2^8 sign patterns are as extreme.
    p_value = sign_flip_p_value({"": [1.0] * 8}, resamples=20000)
    assert p_value == pytest.approx(2 / 2**8, abs=0.005)


def test_examples_to_decide_follow_the_observed_spread_and_effect():
    from capkv.results.uncertainty import Interval, examples_to_decide

    # se = 1.96 / 1.96 = 1; n x ((1.96 + 0.84) / 2)^2 = 10 x 1.96 = 19.6 -> 20
    assert examples_to_decide(Interval(mean=2.0, low=0.04, high=3.96, n=10)) == 20
    # a wider interval at the same effect needs more; a decided one already has enough
    assert examples_to_decide(Interval(mean=2.0, low=-2.0, high=6.0, n=10)) > 20
    assert examples_to_decide(Interval(mean=5.0, low=4.0, high=6.0, n=10)) <= 10
    assert examples_to_decide(Interval(mean=0.0, low=-1.0, high=1.0, n=10)) is None
    assert examples_to_decide(Interval(mean=1e-14, low=-1.0, high=1.0, n=10)) is None
