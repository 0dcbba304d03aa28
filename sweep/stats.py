"""Means with 95 % confidence intervals (Student's t over seeds) and paired differences between arms.

Seeds are the replicates: a trial's number is one draw, the arm's mean over its seeds the estimate, and the CI
half-width t(0.975, n-1) * s / sqrt(n). Paired differences take arm minus baseline on the same bench and seed
(same data split, same channel draws), which removes the seed's own luck from the comparison.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as _scipy_stats


@dataclass(frozen=True)
class Estimate:
    n: int  # finite values used
    mean: float
    ci95: float  # half-width; NaN with fewer than 2 values

    @property
    def low(self) -> float:
        return self.mean - self.ci95

    @property
    def high(self) -> float:
        return self.mean + self.ci95

    def excludes_zero(self) -> bool:
        return self.n >= 2 and math.isfinite(self.ci95) and (self.low > 0 or self.high < 0)


def estimate(values: Sequence[float | None]) -> Estimate:
    """Mean and 95 % CI half-width of the finite values (missing and NaN values are left out, and n says so)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Estimate(0, math.nan, math.nan)
    mean = sum(xs) / n
    if n < 2:
        return Estimate(n, mean, math.nan)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return Estimate(n, mean, float(_scipy_stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n))


def paired(values: Sequence[float | None], baseline: Sequence[float | None]) -> Estimate:
    """Estimate of value - baseline over pairs where both are finite."""
    diffs = []
    for v, b in zip(values, baseline):
        if v is not None and b is not None and math.isfinite(v) and math.isfinite(b):
            diffs.append(v - b)
    return estimate(diffs)
