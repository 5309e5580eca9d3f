"""stats.py against independent references: pass@k by enumeration, Wilson as the roots of its defining quadratic,
the paired sign-flip test against its exact null distribution (and scipy / statsmodels where installed)."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from fractions import Fraction

import pytest

from integration_training import stats


# ---------------------------------------------------------------------------------------------------- pass@k


def pass_at_k_by_enumeration(n: int, c: int, k: int) -> Fraction:
    """The definition (Codex paper, Chen et al. 2021): over every k-subset of the n samples, the share that holds a
    correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in subset) for subset in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_is_the_unbiased_estimator(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            expected = pass_at_k_by_enumeration(n, c, k)
            assert stats.pass_at_k(n, c, k) == pytest.approx(float(expected), abs=1e-12), (n, c, k)
            assert float(expected) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_large_n_matches_binomials():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randrange(1, 300)
        c, k = rng.randrange(0, n + 1), rng.randrange(1, n + 1)
        expected = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert stats.pass_at_k(n, c, k) == pytest.approx(float(expected), rel=1e-9, abs=1e-12), (n, c, k)


# ---------------------------------------------------------------------------------------------------- Wilson


def wilson_by_quadratic(successes: float, n: int, z: float) -> tuple[float, float]:
    """Wilson's interval as its definition: the p0 with |p̂ − p0| ≤ z·sqrt(p0(1 − p0)/n), i.e. the roots of
    (1 + z²/n)·p0² − (2p̂ + z²/n)·p0 + p̂² = 0."""
    p = successes / n
    a, b, c = 1 + z * z / n, -(2 * p + z * z / n), p * p
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


def test_wilson_on_zero_one_scores_is_the_score_interval():
    assert stats.Z == pytest.approx(1.959963984540054, abs=1e-12)  # scipy.stats.norm.isf(0.025)
    rng = random.Random(1)
    for n in (1, 2, 5, 17, 60, 200, 1319):
        for _ in range(20):
            scores = [float(rng.random() < rng.random()) for _ in range(n)]
            interval = stats.wilson_interval(scores)
            low, high = wilson_by_quadratic(sum(scores), n, stats.Z)
            assert interval.value == pytest.approx(sum(scores) / n)
            assert (interval.low, interval.high) == pytest.approx((max(0.0, low), min(1.0, high)), abs=1e-12)
            assert 0.0 <= interval.low <= interval.value <= interval.high <= 1.0


def test_wilson_at_the_edges():
    none, every = stats.wilson_interval([0.0] * 10), stats.wilson_interval([1.0] * 10)
    assert none.low == 0.0 and none.high == pytest.approx(stats.Z**2 / (10 + stats.Z**2))
    assert every.high == 1.0 and every.low == pytest.approx(10 / (10 + stats.Z**2))


def test_wilson_equals_statsmodels_where_installed():
    proportion = pytest.importorskip("statsmodels.stats.proportion", reason="statsmodels is not installed")
    rng = random.Random(2)
    for n in (3, 40, 500):
        count = rng.randrange(0, n + 1)
        low, high = proportion.proportion_confint(count, n, alpha=0.05, method="wilson")
        interval = stats.wilson_interval([1.0] * count + [0.0] * (n - count))
        assert (interval.low, interval.high) == pytest.approx((low, high), abs=1e-12)


def test_wilson_is_conservative_for_fractional_scores():
    """Why the report may use Wilson for sampled pass@1 (c/k per problem): simulated coverage stays ≥ 95%."""
    rng = random.Random(3)
    k, n, trials = 3, 60, 400
    for difficulty in (0.05, 0.3, 0.6):
        rates = [min(1.0, rng.expovariate(1 / difficulty)) for _ in range(n)]  # per-problem solve rates
        truth = sum(rates) / n
        covered = 0
        for _ in range(trials):
            scores = [sum(rng.random() < r for _ in range(k)) / k for r in rates]
            interval = stats.wilson_interval(scores)
            covered += interval.low <= truth <= interval.high
        assert covered / trials >= 0.93, (difficulty, covered / trials)  # 0.95 minus simulation noise


# ---------------------------------------------------------------------------------------------------- paired test


def exact_sign_flip_p(differences: list[Fraction]) -> float:
    """P(sum of ±d ≥ observed) under independent fair sign flips, by convolving the null distribution."""
    distribution = Counter({Fraction(0): 1})
    for d in differences:
        step = Counter()
        for total, ways in distribution.items():
            step[total + d] += ways
            step[total - d] += ways
        distribution = step
    observed = sum(differences)
    return sum(w for total, w in distribution.items() if total >= observed) / 2 ** len(differences)


def fractional_pairs(rng: random.Random, n: int, k: int, gain: float) -> tuple[list[float], list[float]]:
    before = [rng.randrange(k + 1) / k for _ in range(n)]
    after = [min(1.0, max(0.0, b + rng.choice((-1, 0, 0, 1)) / k + (1 / k if rng.random() < gain else 0)))
             for b in before]
    return before, after


def test_paired_test_is_exact_for_few_problems():
    rng = random.Random(4)
    for n in range(1, 13):
        before, after = fractional_pairs(rng, n, 3, gain=0.3)
        expected = exact_sign_flip_p([Fraction(a).limit_denominator(3) - Fraction(b).limit_denominator(3)
                                      for a, b in zip(after, before)])
        if all(a == b for a, b in zip(after, before)):
            expected = 1.0
        assert stats.paired_p_value(before, after) == pytest.approx(expected, abs=1e-12), n


@pytest.mark.parametrize("gain", [0.0, 0.1, 0.25])
def test_paired_test_is_within_noise_of_the_exact_p_for_many_problems(gain):
    rng = random.Random(5 + int(gain * 100))
    before, after = fractional_pairs(rng, 120, 4, gain)
    exact = exact_sign_flip_p([Fraction(a).limit_denominator(4) - Fraction(b).limit_denominator(4)
                               for a, b in zip(after, before)])
    estimate = stats.paired_p_value(before, after)
    noise = math.sqrt(max(exact * (1 - exact), 1e-4) / stats.PERMUTATIONS)
    assert abs(estimate - exact) <= 4 * noise + 1 / stats.PERMUTATIONS, (estimate, exact)


def test_paired_test_matches_scipy_where_installed():
    scipy_stats = pytest.importorskip("scipy.stats", reason="scipy is not installed")
    import numpy as np

    rng = random.Random(6)
    for n, gain in ((10, 0.3), (80, 0.1), (200, 0.0)):
        # Quarters are exact in binary floating point: with thirds, 1/3 − 1/3 from different roundings leaves an
        # observed sum of ~1e-17 where the exact one is 0, and scipy's relative tolerance then drops the ties that
        # stats (and the exact null distribution above) count.
        before, after = fractional_pairs(rng, n, 4, gain)
        reference = scipy_stats.permutation_test(
            (np.asarray(after), np.asarray(before)), lambda x, y, axis: np.mean(x - y, axis=axis),
            permutation_type="samples", alternative="greater", n_resamples=stats.PERMUTATIONS, random_state=0,
            vectorized=True).pvalue
        noise = math.sqrt(max(reference * (1 - reference), 1e-4) / stats.PERMUTATIONS)
        assert abs(stats.paired_p_value(before, after) - reference) <= 6 * noise + 2 / stats.PERMUTATIONS


def test_paired_test_detects_a_real_gain_and_not_noise():
    before = [0.0] * 50 + [1.0] * 50
    better = [1.0 if i < 20 else b for i, b in enumerate(before)]  # 20 more problems solved, none lost
    assert stats.paired_p_value(before, better) < 0.001
    assert stats.paired_p_value(before, before) == 1.0
    swapped = before[25:] + before[:25]  # as many gained as lost: no evidence of a gain
    assert stats.paired_p_value(before, swapped) > 0.05
    worse = [0.0 if i >= 80 else b for i, b in enumerate(before)]  # one-sided: a loss is no gain
    assert stats.paired_p_value(before, worse) > 0.99


def test_one_threshold_decides_correctness():
    assert [stats.is_correct(r) for r in (0.0, 0.5, 0.50001, 1.0)] == [False, False, True, True]
