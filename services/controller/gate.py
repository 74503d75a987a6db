"""The promotion gates, as pure functions of the gate job's measurements.

The reward-model gate: a new RM replaces the serving one only if its pairwise
accuracy on held-out users' comparisons is no worse than the serving RM's on
the very same comparisons, within a tolerance.

The policy gate: a new policy replaces the serving one only if
  - its KL to SFT stays within budget, and
  - a paired, one-sided test on the same held-out prompts (same sampling
    seeds for both policies) shows its reward gain above the threshold at the
    stated confidence, both under the new RM (the one PPO optimised) and
    under the previous serving RM, which PPO never saw. A policy that games
    the new RM's quirks gains under it but not under an RM trained on other
    data; requiring both is a cheap check for reward hacking. In the first
    round there is no previous RM and the decision says so.

Every decision carries its numbers, so decisions.jsonl and the announced
event explain themselves.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any


@dataclass(frozen=True)
class GateDecision:
    model: str  # "reward" | "policy"
    version: str
    promote: bool
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PairedTest:
    """Candidate minus incumbent, prompt by prompt: mean, one-sided lower bound."""

    rm: str
    n: int
    mean_gain: float
    lower_bound: float
    confidence: float
    min_gain: float

    @property
    def passed(self) -> bool:
        return self.n > 0 and self.lower_bound > self.min_gain


def paired_test(
    rm: str, candidate: Sequence[float], incumbent: Sequence[float], confidence: float, min_gain: float
) -> PairedTest:
    """Normal-approximation lower bound of the mean paired difference (n >= 30 or so for it to hold)."""
    if len(candidate) != len(incumbent):
        raise ValueError(f"paired test needs equal lengths, got {len(candidate)} and {len(incumbent)}")
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence={confidence} must be in [0.5, 1)")
    diffs = [c - i for c, i in zip(candidate, incumbent, strict=True)]
    n = len(diffs)
    if n == 0:
        return PairedTest(rm, 0, float("nan"), float("nan"), confidence, min_gain)
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs) if n > 1 else float("inf")
    z = NormalDist().inv_cdf(confidence)
    return PairedTest(rm, n, mean, mean - z * sd / math.sqrt(n), confidence, min_gain)


def decide_policy(
    version: str,
    incumbent: str,
    tests: Sequence[PairedTest],
    kl_to_sft: float,
    max_kl: float,
) -> GateDecision:
    """tests[0] is under the RM PPO optimised; any others under RMs it did not see."""
    numbers = {
        "incumbent": incumbent,
        "kl_to_sft": kl_to_sft,
        "max_kl": max_kl,
        "tests": [asdict(t) | {"passed": t.passed} for t in tests],
    }
    facts = "; ".join(
        f"{t.rm}: gain {t.mean_gain:+.4f}, {t.confidence:.0%} lower bound {t.lower_bound:+.4f} "
        f"(needs > {t.min_gain:+.4f}), n={t.n}"
        for t in tests
    )
    facts += f"; KL to SFT {kl_to_sft:.4f} (budget {max_kl:.4f}) vs serving {incumbent}"
    if not tests or tests[0].n == 0:
        return GateDecision("policy", version, False, "rejected: no held-out prompts to evaluate on", numbers)
    if not kl_to_sft <= max_kl:
        return GateDecision("policy", version, False, f"rejected: KL over budget; {facts}", numbers)
    failed = [t.rm for t in tests if not t.passed]
    if failed:
        return GateDecision(
            "policy", version, False, f"rejected: no significant gain under {', '.join(failed)}; {facts}", numbers
        )
    if len(tests) == 1:
        facts += "; first round: no previous RM to confirm the gain with"
    return GateDecision("policy", version, True, f"promoted: {facts}", numbers)


def decide_reward(
    version: str, accuracy: float, pairs: int, incumbent: str, incumbent_accuracy: float | None, tolerance: float
) -> GateDecision:
    """Accuracies on the same held-out comparisons (ties dropped)."""
    numbers = {
        "accuracy": accuracy,
        "pairs": pairs,
        "incumbent": incumbent,
        "incumbent_accuracy": incumbent_accuracy,
        "tolerance": tolerance,
    }
    if not incumbent or incumbent_accuracy is None:
        return GateDecision(
            "reward",
            version,
            True,
            f"promoted: first reward model (held-out accuracy {accuracy:.4f}, {pairs} pairs)",
            numbers,
        )
    facts = (
        f"held-out pair accuracy {accuracy:.4f} vs serving {incumbent} {incumbent_accuracy:.4f} "
        f"on the same {pairs} pairs (tolerance {tolerance:.4f})"
    )
    if pairs == 0:
        return GateDecision("reward", version, False, "rejected: no held-out comparisons to compare on", numbers)
    if accuracy >= incumbent_accuracy - tolerance:
        return GateDecision("reward", version, True, f"promoted: {facts}", numbers)
    return GateDecision("reward", version, False, f"rejected: less accurate than the serving RM; {facts}", numbers)
