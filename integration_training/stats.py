"""The statistics of held-out evaluation, in one place: correctness, pass@k, the interval, the paired test.

Used by `evaluate.py` (per-problem scores and aggregates), `metrics.jsonl` (what evaluation logs) and `report.py`
(the paired test between two evaluations of the same problems). stdlib only, so importing it costs nothing.

- `is_correct(reward)`: one threshold (`CORRECT_THRESHOLD`) for every "is this sample right" question; verifiers
  return 0/1, custom `module:function` rewards may be fractional.
- `pass_at_k(n, c, k)`: the unbiased estimator of the Codex paper (Chen et al. 2021, eq. 1),
  1 − C(n−c, k) / C(n, k).
- `wilson_interval(scores)`: the 95% Wilson score interval of a mean of per-problem scores in [0, 1], equal to
  statsmodels' `proportion_confint(sum, n, method="wilson")` on 0/1 scores. Per-problem scores can be fractional
  (sampled pass@1 with k samples is c/k): the same formula is used there because a [0, 1] score with mean p has
  variance at most p(1 − p) — the Bernoulli variance Wilson assumes — so the interval is conservative (never
  narrower than the normal approximation with the true variance) and stays inside [0, 1]. `INTERVAL_NOTE` says
  this in the report.
- `paired_p_value(before, after)`: one-sided paired sign-flip permutation test that `after` beats `before` on the
  same problems (the null: each problem's difference is as likely negative as positive). Exact enumeration when
  2^n ≤ `PERMUTATIONS`, otherwise seeded Monte Carlo with the (count + 1) / (resamples + 1) estimate — as
  scipy's `permutation_test(..., permutation_type="samples", alternative="greater")` does.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

CORRECT_THRESHOLD = 0.5  # a sample (or a greedy completion) is correct when its reward exceeds this
CONFIDENCE = 0.95
Z = NormalDist().inv_cdf(1 - (1 - CONFIDENCE) / 2)  # 1.959963984540054, statsmodels' norm.isf(0.025)
PERMUTATIONS = 20_000
INTERVAL_NOTE = (
    "Brackets: 95% Wilson score intervals over problems. Greedy scores are 0/1 per problem, where Wilson is the"
    " usual binomial interval; sampled pass@1 is a fraction per problem (correct samples / samples), where the"
    " same interval is conservative: a score in [0, 1] with mean p has variance at most p(1 − p), the variance"
    " Wilson assumes."
)


@dataclass(frozen=True)
class Interval:
    """A mean and its 95% interval."""

    value: float
    low: float
    high: float


def is_correct(reward: float) -> bool:
    return reward > CORRECT_THRESHOLD


def mean(values: Sequence[float]) -> float:
    assert len(values) > 0, "mean of nothing"
    return sum(values) / len(values)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n−c, k)/C(n, k), as a stable product."""
    assert 0 <= c <= n and 1 <= k <= n, (n, c, k)
    if n - c < k:
        return 1.0
    # C(n−c, k)/C(n, k) = Π_{i=n−c+1..n} (1 − k/i); avoids huge binomials.
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def wilson_interval(scores: Sequence[float]) -> Interval:
    """Mean of per-problem scores in [0, 1] with its 95% Wilson score interval (n = number of problems)."""
    assert len(scores) > 0, "an interval over no problems"
    assert all(0.0 <= s <= 1.0 for s in scores), "Wilson needs per-problem scores in [0, 1]"
    n, p = len(scores), mean(scores)
    z2 = Z * Z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = Z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    # Mathematically 0 ≤ low ≤ p ≤ high ≤ 1 (a property of Wilson); the clamps only remove rounding (p = 0 gives a
    # low of ~1e-17 otherwise).
    return Interval(value=p, low=max(0.0, min(p, centre - half)), high=min(1.0, max(p, centre + half)))


def paired_p_value(before: Sequence[float], after: Sequence[float], seed: int = 0,
                   permutations: int = PERMUTATIONS) -> float:
    """One-sided paired sign-flip permutation test that `after` beats `before` on the same problems."""
    assert len(before) == len(after) and len(before) > 0, "a paired test needs the same problems on both sides"
    differences = [a - b for a, b in zip(after, before)]
    if all(d == 0 for d in differences):
        return 1.0
    observed = sum(differences) - 1e-12 * max(1.0, sum(abs(d) for d in differences))  # ties count as "as large"
    if 2 ** len(differences) <= permutations:  # exact: every sign pattern once
        patterns = itertools.product((1, -1), repeat=len(differences))
        at_least = sum(sum(s * d for s, d in zip(signs, differences)) >= observed for signs in patterns)
        return at_least / 2 ** len(differences)
    rng = random.Random(seed)
    at_least = 0
    for _ in range(permutations):
        flipped = sum(d if rng.random() < 0.5 else -d for d in differences)
        at_least += flipped >= observed
    return (at_least + 1) / (permutations + 1)


def format_p(p: float) -> str:
    """Four decimals; below 0.0001 (the test resolves ~1/PERMUTATIONS) "< 0.0001" rather than a bare 0.0000."""
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"
