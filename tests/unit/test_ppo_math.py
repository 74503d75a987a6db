"""PPO's reward shaping, GAE and clipped losses against hand-computed values."""

import math

import pytest
import torch

from trainers.ppo import AdaptiveKL, clipped_policy_loss, clipped_value_loss, gae, kl_penalized_rewards, whiten


def test_kl_reward_and_score_placement_with_right_and_left_padding():
    beta, score = 0.1, 2.0
    # right padding: three real tokens then one pad; the pad's log-probs are garbage
    logp = torch.tensor([[-1.0, -2.0, -1.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.0, -3.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    rewards, kl = kl_penalized_rewards(torch.tensor([score]), logp, ref, mask, beta)
    assert kl[0].tolist() == pytest.approx([0.5, -1.0, 0.0, 0.0])
    assert rewards[0].tolist() == pytest.approx([-0.05, 0.1, 0.0 + score, 0.0])  # score on the last REAL token
    # left padding: the same tokens shifted right by one
    rewards_l, kl_l = kl_penalized_rewards(
        torch.tensor([score]), logp.roll(1, 1), ref.roll(1, 1), mask.roll(1, 1), beta
    )
    assert rewards_l[0].tolist() == pytest.approx([0.0, -0.05, 0.1, score])
    assert kl_l[0].tolist() == pytest.approx([0.0, 0.5, -1.0, 0.0])


def test_kl_reward_rows_of_different_lengths_in_one_batch():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 0]])
    zeros = torch.zeros(3, 4)
    rewards, _ = kl_penalized_rewards(torch.tensor([1.0, 2.0, 3.0]), zeros, zeros, mask, beta=0.02)
    assert rewards.tolist() == [[0, 0, 0, 1.0], [0, 2.0, 0, 0], [0, 0, 3.0, 0]]


def test_gae_undiscounted_is_returns_minus_values():
    rewards = torch.tensor([[0.1, -0.2, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.3]])
    mask = torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert ret[0].tolist() == pytest.approx([0.9, 0.8, 1.0])  # sums of future rewards
    assert adv[0].tolist() == pytest.approx([0.4, 0.4, 0.7])


def test_gae_with_lambda_and_padding_ends_the_episode_at_the_last_real_token():
    # deltas (γ=1): t2: 1.0 - 0.3 = 0.7; t1: -0.2 + 0.3 - 0.4 = -0.3; t0: 0.1 + 0.4 - 0.5 = 0.0
    # λ=0.5: A2 = 0.7, A1 = -0.3 + 0.5·0.7 = 0.05, A0 = 0 + 0.5·0.05 = 0.025
    rewards = torch.tensor([[0.1, -0.2, 1.0, 5.0]])  # the pad's reward and value must be ignored
    values = torch.tensor([[0.5, 0.4, 0.3, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.025, 0.05, 0.7, 0.0])
    assert ret[0].tolist() == pytest.approx([0.525, 0.45, 1.0, 0.0])


def test_clipped_policy_loss_four_cases():
    # ratios 1.5, 1.5, 0.5, 0.5 against advantages +1, -1, +1, -1; ε = 0.2
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]]))
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, clipfrac = clipped_policy_loss(new, old, adv, torch.ones(1, 4), clip=0.2)
    # max(-Aρ, -A·clip(ρ)):  max(-1.5,-1.2)=-1.2 (clipped)  max(1.5,1.2)=1.5
    #                       max(-0.5,-0.8)=-0.5  max(0.5,0.8)=0.8 (clipped)
    assert float(loss) == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4, abs=1e-6)
    assert float(clipfrac) == pytest.approx(0.5)


def test_clipped_policy_loss_ignores_padding():
    new, old = torch.tensor([[0.1, 50.0]]), torch.zeros(1, 2)
    loss, _ = clipped_policy_loss(new, old, torch.tensor([[1.0, 1.0]]), torch.tensor([[1, 0]]), clip=0.2)
    assert float(loss) == pytest.approx(-math.exp(0.1), abs=1e-6)


def test_clipped_value_loss():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[0.5, 0.1]])
    returns = torch.tensor([[1.0, -1.0]])
    loss, clipfrac = clipped_value_loss(new, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: V clipped to 0.2 -> max(0.25, 0.64) = 0.64 (clipped); token 1: inside the range -> 1.21
    assert float(loss) == pytest.approx(0.5 * (0.64 + 1.21) / 2, abs=1e-6)
    assert float(clipfrac) == pytest.approx(0.5)


def test_whiten_over_real_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    out = whiten(x, torch.tensor([[1, 1, 1, 0]]))
    assert out[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-4)  # sample std of 1,2,3 is 1


def test_adaptive_kl_controller():
    control = AdaptiveKL(beta=0.1, target=6.0, horizon=100)
    assert control.update(kl=12.0, n=10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error clipped at +0.2
    assert control.update(kl=6.0, n=10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # on target: unchanged


def test_weight_ema_averages_the_trainable_weights_and_round_trips():
    from trainers.nn import WeightEMA

    model = torch.nn.Linear(2, 1, bias=True)
    model.bias.requires_grad_(False)  # frozen tensors are not averaged
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = WeightEMA(model, decay=0.75)
    assert set(ema.state_dict()) == {"weight"}
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[5.0, -2.0]]))
    ema.update(model)  # 0.75·[1, 2] + 0.25·[5, −2] = [2, 1]
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[6.0, 5.0]]))
    ema.update(model)  # 0.75·[2, 1] + 0.25·[6, 5] = [3, 2]
    assert torch.allclose(ema.state_dict()["weight"], torch.tensor([[3.0, 2.0]]))

    again = WeightEMA(model, decay=0.75)
    again.load_state_dict(ema.state_dict())
    again.copy_to(model)
    assert torch.allclose(model.weight, torch.tensor([[3.0, 2.0]]))
    with pytest.raises(Exception, match="EMA lacks 1 tensors"):
        WeightEMA(model, decay=0.75).load_state_dict({})
