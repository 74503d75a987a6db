"""Confidence intervals for the evaluation: closed-form, so a test can check
them by hand.

- `wilson`: a binomial proportion (the RM's pairwise accuracy). Unlike the
  normal interval it stays inside [0, 1] and is sensible at 0 or n successes.
- `paired_win_rate`: model A against model B on the same prompts. Per prompt
  A scores 1 for a win, 0.5 for a tie and 0 for a loss (on gold score). The
  win rate's interval is Wilson's with wins + ties/2 as the successes; the
  mean gold-score difference gets a normal interval, mean ± z·s/√n with the
  sample standard deviation s (n - 1 in the denominator).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

Z95 = 1.959963984540054


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for successes/n; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} must be in [0, n={n}]")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_ci(values: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high): normal interval with the sample standard deviation."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0, 0.0
    mean = sum(values) / n
    if n == 1:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = z * sd / math.sqrt(n)
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class WinRate:
    n: int
    wins: int
    ties: int
    losses: int
    win_rate: float  # (wins + ties/2) / n
    ci_low: float
    ci_high: float
    mean_diff: float  # mean of gold(A) - gold(B)
    diff_ci_low: float
    diff_ci_high: float

    @property
    def significant(self) -> bool:
        """Both intervals exclude "no difference"."""
        return (self.ci_low > 0.5 or self.ci_high < 0.5) and (self.diff_ci_low > 0 or self.diff_ci_high < 0)

    def as_dict(self) -> dict:
        return {**asdict(self), "significant": self.significant}


def paired_win_rate(a: Sequence[float], b: Sequence[float], z: float = Z95) -> WinRate:
    """A against B, paired per prompt (a[i] and b[i] are scores of one prompt)."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need equal lengths, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    wins = sum(d > 0 for d in diffs)
    ties = sum(d == 0 for d in diffs)
    losses = len(diffs) - wins - ties
    n = len(diffs)
    low, high = wilson(wins + ties / 2, n, z)
    mean, dlow, dhigh = mean_ci(diffs, z)
    return WinRate(n, wins, ties, losses, (wins + ties / 2) / n if n else 0.0, low, high, mean, dlow, dhigh)
