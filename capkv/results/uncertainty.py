"""Confidence intervals and paired comparisons of per-example scores.

A task's headline is a mean of per-example scores, possibly through strata: LongBench averages
over datasets and RULER over subtasks, each dataset's mean over its own examples, so a dataset
with few examples weighs as much as one with many. Every function here respects that structure:
examples are resampled within their stratum and the statistic is the mean of the stratum means,
exactly as the headline is computed (:func:`capkv.results.metrics.summarize`). A task without strata is
one stratum.

Intervals are percentile bootstraps (Efron and Tibshirani 1993, ch. 13) with a fixed seed, so a
table rebuilt from the same rows is identical. Two methods run on the same examples are compared
*paired*: the per-example differences are resampled jointly, which removes the between-example
variance that dominates unpaired intervals, and tested with a sign-flip permutation test (under
the null hypothesis of no difference, each example's difference is as likely negative as
positive).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0

Strata = Mapping[str, Sequence[float]]


@dataclass(frozen=True)
class Interval:
    """A headline mean with its bootstrap confidence interval.

    Attributes
    ----------
    mean : float
        Mean of the stratum means (the headline).
    low, high : float
        Bounds of the percentile bootstrap interval.
    n : int
        Examples behind the mean (all strata together).
    """

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


@dataclass(frozen=True)
class PairedComparison:
    """Method A minus method B on the same examples.

    Attributes
    ----------
    difference : Interval
        Mean paired difference (through the strata) with its paired bootstrap interval.
    p_value : float
        Two-sided sign-flip permutation test of "no difference".
    wins, losses, ties : int
        Examples where A scored above, below and level with B.
    """

    difference: Interval
    p_value: float
    wins: int
    losses: int
    ties: int

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (at the level it was computed with)."""
        return self.difference.low > 0 or self.difference.high < 0


def _arrays(strata: Strata) -> list[np.ndarray]:
    arrays = [np.asarray(values, dtype=float) for _, values in sorted(strata.items())]
    if not arrays or any(a.size == 0 for a in arrays):
        raise ValueError("Every stratum needs at least one score; got an empty one.")
    return arrays


def headline(strata: Strata) -> float:
    """Mean of the stratum means."""
    return float(np.mean([a.mean() for a in _arrays(strata)]))


def bootstrap_headlines(strata: Strata, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """The headline of ``resamples`` bootstrap samples (examples drawn within their stratum)."""
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    arrays = _arrays(strata)
    for values in arrays:
        draws = rng.integers(0, values.size, size=(resamples, values.size))
        means += values[draws].mean(axis=1)
    return means / len(arrays)


def _interval(strata: Strata, samples: np.ndarray, confidence: float) -> Interval:
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    n = sum(a.size for a in _arrays(strata))
    return Interval(headline(strata), float(low), float(high), n)


def mean_interval(
    strata: Strata, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = SEED
) -> Interval:
    """The headline mean of ``strata`` (stratum name -> per-example scores) and its interval."""
    return _interval(strata, bootstrap_headlines(strata, resamples, seed), confidence)


POWER = 0.8  # the chance a study of the estimated size decides an effect of the observed size


def examples_to_decide(
    difference: Interval, confidence: float = CONFIDENCE, power: float = POWER
) -> int | None:
    """Examples a paired comparison needs for its interval to exclude 0 with probability
    ``power``, were the true difference the observed mean and the spread the observed one: the
    usual normal-approximation sample size, ``n x ((z_(1-a/2) + z_power) x se / |mean|)^2``,
    with the standard error ``se`` read off the bootstrap interval (half its width over
    ``z_(1-a/2)``), so strata are weighted as the headline weights them. None where the mean
    difference is 0 (no number of examples decides it; below 1e-9 on the 0-100 scale, the
    rounding of a mean of equal scores)."""
    if abs(difference.mean) < 1e-9:
        return None
    normal = NormalDist()
    z_interval = normal.inv_cdf(1 - (1 - confidence) / 2)
    standard_error = difference.half_width / z_interval
    needed = (
        difference.n
        * ((z_interval + normal.inv_cdf(power)) * standard_error / difference.mean) ** 2
    )
    return max(1, math.ceil(needed))


def paired_differences(a: Mapping[str, Mapping[str, float]], b: Mapping[str, Mapping[str, float]]):
    """Per stratum, A's score minus B's on the examples both have (stratum -> id -> score)."""
    differences = {}
    for stratum in sorted(set(a) & set(b)):
        shared = sorted(set(a[stratum]) & set(b[stratum]))
        if shared:
            differences[stratum] = [a[stratum][i] - b[stratum][i] for i in shared]
    if not differences:
        raise ValueError("The two runs share no example: a paired comparison needs the same ones.")
    return differences


def sign_flip_p_value(differences: Strata, resamples: int = RESAMPLES, seed: int = SEED) -> float:
    """Two-sided p-value of "no difference": random sign flips of every example's difference.

    The statistic is the headline of the differences; the p-value counts flipped samples at
    least as far from 0 as the observed one, plus the observed one itself (so it is never 0).
    """
    rng = np.random.default_rng(seed)
    arrays = _arrays(differences)
    observed = abs(np.mean([d.mean() for d in arrays]))
    flipped = np.zeros(resamples)
    for values in arrays:
        signs = rng.choice((-1.0, 1.0), size=(resamples, values.size))
        flipped += (signs * values).mean(axis=1)
    flipped = np.abs(flipped / len(arrays))
    extreme = np.count_nonzero(flipped >= observed - 1e-12)
    return float((1 + extreme) / (1 + resamples))


def compare(
    a: Mapping[str, Mapping[str, float]],
    b: Mapping[str, Mapping[str, float]],
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> PairedComparison:
    """Paired comparison of runs A and B: stratum -> example id -> score for each.

    Only examples both runs finished are compared.
    """
    differences = paired_differences(a, b)
    samples = bootstrap_headlines(differences, resamples, seed)
    flat = np.concatenate(_arrays(differences))
    return PairedComparison(
        difference=_interval(differences, samples, confidence),
        p_value=sign_flip_p_value(differences, resamples, seed),
        wins=int(np.count_nonzero(flat > 0)),
        losses=int(np.count_nonzero(flat < 0)),
        ties=int(np.count_nonzero(flat == 0)),
    )
