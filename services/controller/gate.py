"""The promotion gate: a new policy replaces the serving one only if, on the
held-out split, its reward-model score improves and its KL to the SFT policy
stays within budget. Pure functions, so the rule is easy to read and test."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Evaluation:
    version: str
    mean_reward: float
    kl_to_reference: float
    n: int


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    reward_gain: float


def decide(candidate: Evaluation, incumbent: Evaluation, min_reward_gain: float, max_kl: float) -> GateDecision:
    """Both evaluations must come from the same reward model and split."""
    gain = candidate.mean_reward - incumbent.mean_reward
    facts = (
        f"RM score {candidate.mean_reward:+.4f} vs serving {incumbent.version} {incumbent.mean_reward:+.4f} "
        f"(gain {gain:+.4f}, needs > {min_reward_gain:+.4f}); KL to SFT {candidate.kl_to_reference:.4f} "
        f"(budget {max_kl:.4f}); n={candidate.n}"
    )
    if candidate.n == 0:
        return GateDecision(False, "rejected: no held-out prompts to evaluate on", gain)
    if candidate.kl_to_reference > max_kl:
        return GateDecision(False, f"rejected: KL over budget; {facts}", gain)
    if not gain > min_reward_gain:
        return GateDecision(False, f"rejected: RM score did not improve enough; {facts}", gain)
    return GateDecision(True, f"promoted: {facts}", gain)
