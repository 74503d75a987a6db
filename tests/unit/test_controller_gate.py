from services.controller.gate import Evaluation, decide


def ev(version, reward, kl, n=20):
    return Evaluation(version, reward, kl, n)


def test_promotes_when_reward_improves_within_kl_budget():
    d = decide(ev("ppo-1", 0.5, 2.0), ev("sft-1", 0.1, 0.0), min_reward_gain=0.0, max_kl=5.0)
    assert d.promote and abs(d.reward_gain - 0.4) < 1e-9
    assert d.reason.startswith("promoted:") and "sft-1" in d.reason


def test_rejects_when_kl_over_budget_even_if_reward_improves():
    d = decide(ev("ppo-1", 2.0, 9.0), ev("sft-1", 0.1, 0.0), min_reward_gain=0.0, max_kl=5.0)
    assert not d.promote and "KL over budget" in d.reason


def test_rejects_when_reward_does_not_improve_enough():
    d = decide(ev("ppo-1", 0.15, 1.0), ev("sft-1", 0.1, 0.0), min_reward_gain=0.1, max_kl=5.0)
    assert not d.promote and "did not improve" in d.reason
    # equal is not an improvement
    assert not decide(ev("p", 0.1, 0.0), ev("s", 0.1, 0.0), 0.0, 5.0).promote


def test_rejects_without_evaluation_data():
    assert not decide(ev("p", 1.0, 0.0, n=0), ev("s", 0.0, 0.0), 0.0, 5.0).promote
