"""The K-way reward-model loss against hand-computed values."""

import math

import pytest
import torch

from services.common.models import RewardModel, load_tokenizer, pad_batch
from trainers.rm import forward_prompts, kway_loss, ranking_pairs


def nll(margin: float) -> float:
    """-log σ(margin)"""
    return math.log1p(math.exp(-margin))


def test_pairs_cover_every_non_tie_pair_of_each_prompt_with_mixed_k():
    # prompt A: K=3, no ties; prompt B: K=4, responses 0 and 2 tied; prompt C: K=2, all tied
    winners, losers, weights, n_prompts = ranking_pairs([[1, 2, 3], [2, 1, 2, 3], [1, 1]])
    pairs = set(zip(winners.tolist(), losers.tolist(), strict=True))
    assert pairs == {
        (0, 1),
        (0, 2),
        (1, 2),  # A: C(3,2) = 3
        (4, 3),
        (4, 5),
        (4, 6),
        (3, 6),
        (5, 6),
    }  # B: C(4,2) - 1 tie = 5
    assert n_prompts == 2  # C has no non-tie pair and counts for nothing
    assert weights.tolist() == pytest.approx([1 / 3] * 3 + [1 / 5] * 5)


def test_loss_matches_hand_computation_and_normalises_per_prompt():
    scores = torch.tensor(
        [
            2.0,
            1.0,
            0.0,  # A (ranks 1, 2, 3)
            0.5,
            0.0,
            1.0,
            -1.0,  # B (ranks 2, 1, 2, 3)
            3.0,
            -3.0,
        ]
    )  # C (tied)
    w, lo, weights, n = ranking_pairs([[1, 2, 3], [2, 1, 2, 3], [1, 1]])
    loss_a = (nll(1.0) + nll(2.0) + nll(1.0)) / 3  # 1/C(3,2)
    loss_b = (nll(-0.5) + nll(-1.0) + nll(1.0) + nll(1.5) + nll(2.0)) / 5  # 1/(non-tie pairs)
    expected = (loss_a + loss_b) / 2
    assert float(kway_loss(scores, w, lo, weights, n)) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx((0.251151 + 0.585788) / 2, abs=1e-5)  # A and B worked out by hand


def test_without_ties_the_normaliser_is_c_k_2():
    k = 5
    scores = torch.randn(k)
    w, lo, weights, n = ranking_pairs([list(range(1, k + 1))])
    brute = sum(nll(float(scores[i] - scores[j])) for i in range(k) for j in range(i + 1, k)) / math.comb(k, 2)
    assert float(kway_loss(scores, w, lo, weights, n)) == pytest.approx(brute, abs=1e-5)


def test_micro_batches_sum_to_the_full_batch_loss():
    scores = torch.tensor([0.3, -0.2, 1.0, 0.1, 0.0, 0.7, -0.4])
    ranks = [[1, 2, 3], [3, 1, 2, 4]]
    full = kway_loss(scores, *ranking_pairs(ranks)[:3], n_prompts=2)
    first = kway_loss(scores[:3], *ranking_pairs(ranks[:1])[:3], n_prompts=2)
    second = kway_loss(scores[3:], *ranking_pairs(ranks[1:])[:3], n_prompts=2)
    assert float(first + second) == pytest.approx(float(full), abs=1e-6)


def test_each_response_is_forwarded_once_and_scored_as_if_alone(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    model = RewardModel.from_causal_lm(tiny_model_dir).eval()
    prompts = [
        ([[5, 6, 7, 2], [5, 6, 2], [5, 9, 9, 9, 9, 2]], [1, 3, 2]),  # K=3
        ([[8, 2], [8, 8, 2], [8, 1, 1, 2], [8, 3, 2], [8, 4, 4, 4, 2]], [2, 1, 3, 3, 4]),
    ]  # K=5, a tie
    with torch.no_grad():
        scores, (w, lo, weights, n) = forward_prompts(model, prompts, tok.pad_token_id, "cpu", bf16=False)
        alone = torch.cat([model.score(*pad_batch([seq], tok.pad_token_id)) for seqs, _ in prompts for seq in seqs])
    assert scores.shape == (8,)  # 3 + 5 responses, one forward row each
    assert torch.allclose(scores, alone, atol=1e-5)  # padding and batch-mates change nothing
    assert n == 2 and len(w) == 3 + (10 - 1)
