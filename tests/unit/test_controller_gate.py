"""services/controller/gate.py: the RM gate and the paired policy gate, as pure functions; and the gate
job's cache of policy samples (services/controller/gate_eval.py)."""

import math

import pytest
import torch

from services.controller.gate import decide_policy, decide_reward, paired_test
from services.controller.gate_eval import GateEvalConfig, cached_sample


def test_paired_test_lower_bound_matches_the_normal_approximation():
    cand, inc = [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]  # diffs 1..4: mean 2.5, sd 1.29
    t = paired_test("new_rm", cand, inc, confidence=0.9, min_gain=0.0)
    assert t.n == 4 and t.mean_gain == pytest.approx(2.5)
    assert t.lower_bound == pytest.approx(2.5 - 1.2815516 * 1.2909944 / 2, rel=1e-6)
    assert t.passed
    # The same mean with a spread that swamps it is not significant.
    noisy = paired_test("new_rm", [10.0, -5.0, 12.0, -7.0], [0.0] * 4, confidence=0.9, min_gain=0.0)
    assert noisy.mean_gain > 0 and not noisy.passed
    with pytest.raises(ValueError, match="equal lengths"):
        paired_test("x", [1.0], [1.0, 2.0], 0.9, 0.0)
    assert not paired_test("x", [], [], 0.9, 0.0).passed


def _gain(rm, n=64, gain=0.5, spread=0.1):
    return paired_test(rm, [gain + spread * (-1) ** i for i in range(n)], [0.0] * n, 0.95, 0.0)


def test_policy_gate_needs_both_rms_and_the_kl_budget():
    both = decide_policy("ppo-2", "ppo-1", [_gain("new"), _gain("previous")], kl_to_sft=3.0, max_kl=10.0)
    assert both.promote and both.reason.startswith("promoted:") and "ppo-1" in both.reason
    assert [t["passed"] for t in both.numbers["tests"]] == [True, True]
    # Gains only under the RM PPO optimised: the unoptimised RM sees none -> reward hacking suspected.
    hacked = decide_policy("ppo-2", "ppo-1", [_gain("new"), _gain("previous", gain=0.0)], 3.0, 10.0)
    assert not hacked.promote and "no significant gain under previous" in hacked.reason
    over = decide_policy("ppo-2", "ppo-1", [_gain("new"), _gain("previous")], kl_to_sft=11.0, max_kl=10.0)
    assert not over.promote and "KL over budget" in over.reason
    first = decide_policy("ppo-1", "sft-1", [_gain("new")], 3.0, 10.0)
    assert first.promote and "no previous RM" in first.reason
    empty = decide_policy("ppo-1", "sft-1", [paired_test("new", [], [], 0.9, 0.0)], 0.0, 10.0)
    assert not empty.promote and "no held-out prompts" in empty.reason
    nan_kl = decide_policy("ppo-1", "sft-1", [_gain("new")], math.nan, 10.0)
    assert not nan_kl.promote


def test_reward_gate_compares_on_the_same_pairs_within_tolerance():
    first = decide_reward("rm-1", 0.6, 40, "", None, tolerance=0.02)
    assert first.promote and "first reward model" in first.reason
    assert decide_reward("rm-2", 0.59, 40, "rm-1", 0.60, tolerance=0.02).promote  # within tolerance
    worse = decide_reward("rm-2", 0.55, 40, "rm-1", 0.60, tolerance=0.02)
    assert not worse.promote and "less accurate" in worse.reason
    assert worse.numbers == {
        "accuracy": 0.55,
        "pairs": 40,
        "incumbent": "rm-1",
        "incumbent_accuracy": 0.60,
        "tolerance": 0.02,
    }
    assert not decide_reward("rm-2", 0.9, 0, "rm-1", 0.6, 0.02).promote


def test_gate_samples_of_a_policy_are_drawn_once_per_prompts_and_settings(tmp_path):
    cfg = GateEvalConfig(prompts=2, max_new_tokens=4)
    draws = []

    def draw(rows):
        return lambda: draws.append(rows) or rows

    first = [([1, 2], [3, 4]), ([5], [6])]
    got = cached_sample(tmp_path, "ppo-a", torch.float32, ["p", "q"], cfg, draw(first))
    assert got == first and len(draws) == 1
    # the next round's gate: the same policy (now the incumbent) on the same prompts is not decoded again
    assert cached_sample(tmp_path, "ppo-a", torch.float32, ["p", "q"], cfg, draw([])) == first and len(draws) == 1
    # another policy, other prompts, another sampling setting or dtype: drawn
    other = [([1], [2])]
    for args in (
        ("ppo-b", torch.float32, ["p", "q"], cfg),
        ("ppo-a", torch.float32, ["p", "r"], cfg),
        ("ppo-a", torch.float32, ["p", "q"], GateEvalConfig(prompts=2, max_new_tokens=5)),
        ("ppo-a", torch.bfloat16, ["p", "q"], cfg),
    ):
        assert cached_sample(tmp_path, *args, draw(other)) == other
    assert len(draws) == 5
    # a half-written file is drawn again and replaced
    for path in tmp_path.glob("ppo-b-*.json"):
        path.write_text("[[[1], [")
    assert cached_sample(tmp_path, "ppo-b", torch.float32, ["p", "q"], cfg, draw(first)) == first and len(draws) == 6
    assert cached_sample(tmp_path, "ppo-b", torch.float32, ["p", "q"], cfg, draw([])) == first and len(draws) == 6
