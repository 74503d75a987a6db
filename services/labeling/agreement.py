"""Labeler agreement on overlapping tasks, as pure functions over rankings.

A ranking maps sample id -> rank (1 = best, equal ranks are ties). Two
labelers who ranked the same task are compared pair by pair over the
samples both ranked:

- **Pairwise agreement**: the share of response pairs that the two
  labelers order the same way. A pair is ordered the same way when both
  prefer the same response, or when both tie it. A tie against a strict
  preference is a disagreement. (InstructGPT's ~73% is this figure over
  strict preferences; counting ties as their own order is the natural
  extension when ties are encouraged, and it is what a reward model that
  drops ties can never exceed on the pairs it learns from.)
- **Kendall's tau-b**: (concordant − discordant) / sqrt((n0 − t1)(n0 − t2)),
  n0 = C(n, 2) pairs, t1 and t2 the pairs each labeler tied. It is
  undefined (None) when either labeler tied everything.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import combinations

Ranking = Mapping[str, int]


@dataclass(frozen=True)
class PairCounts:
    """How two rankings of one task compare over their C(n, 2) response pairs."""

    pairs: int = 0
    same: int = 0  # same strict order, or both tied
    concordant: int = 0
    discordant: int = 0
    tied_a: int = 0
    tied_b: int = 0

    def __add__(self, other: PairCounts) -> PairCounts:
        return PairCounts(*(x + y for x, y in zip(self.as_tuple(), other.as_tuple(), strict=True)))

    def as_tuple(self) -> tuple[int, ...]:
        return (self.pairs, self.same, self.concordant, self.discordant, self.tied_a, self.tied_b)

    @property
    def agreement(self) -> float | None:
        return self.same / self.pairs if self.pairs else None

    @property
    def tau_b(self) -> float | None:
        denominator = math.sqrt((self.pairs - self.tied_a) * (self.pairs - self.tied_b))
        return (self.concordant - self.discordant) / denominator if denominator else None


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def compare(a: Ranking, b: Ranking) -> PairCounts:
    """Compare two labelers' rankings of one task over the samples both ranked."""
    shared = sorted(set(a) & set(b))
    pairs = same = concordant = discordant = tied_a = tied_b = 0
    for i, j in combinations(shared, 2):
        sa, sb = _sign(a[i] - a[j]), _sign(b[i] - b[j])
        pairs += 1
        same += sa == sb
        tied_a += sa == 0
        tied_b += sb == 0
        if sa and sb:
            concordant += sa == sb
            discordant += sa != sb
    return PairCounts(pairs, same, concordant, discordant, tied_a, tied_b)


@dataclass
class Agreement:
    pairwise: float | None  # over every response pair of every labeler pair
    pairs: int
    kendall_tau_b: float | None  # mean over (task, labeler pair) where defined
    overlap_tasks: int
    per_labeler: dict[str, PairCounts]  # each labeler against all others


def agreement(tasks: Mapping[str, Mapping[str, Ranking]]) -> Agreement:
    """`tasks`: task id -> {labeler id -> ranking}. Tasks with one labeler are ignored."""
    total = PairCounts()
    taus: list[float] = []
    per_labeler: dict[str, PairCounts] = {}
    overlap = 0
    for by_labeler in tasks.values():
        if len(by_labeler) < 2:
            continue
        overlap += 1
        for x, y in combinations(sorted(by_labeler), 2):
            counts = compare(by_labeler[x], by_labeler[y])
            total += counts
            if counts.tau_b is not None:
                taus.append(counts.tau_b)
            for labeler in (x, y):
                per_labeler[labeler] = per_labeler.get(labeler, PairCounts()) + counts
    return Agreement(total.agreement, total.pairs, sum(taus) / len(taus) if taus else None, overlap, per_labeler)


def mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None
