"""The engine's sampler: each row draws from its own distribution with its own
seeded generator, top-k / top-p never let a filtered token through, and a row
with non-finite scores is flagged alone."""

from __future__ import annotations

import math

import pytest
import torch

from services.policy.engine import _Group, _Row, sample
from services.policy.params import GenParams
from services.policy.request import GenRequest

PROBS = [0.5, 0.3, 0.2, 0.0, 0.0]


def rows(n: int, seed0: int = 0, **params) -> list[_Row]:
    out = []
    for i in range(n):
        p = GenParams(max_new_tokens=4, seed=seed0 + i, **params)
        group = _Group(GenRequest([1, 2], p, lambda event: None), "v")
        out.append(_Row(group, 0, seed0 + i, torch.device("cpu")))
    return out


def logits(n: int) -> torch.Tensor:
    return torch.tensor([[math.log(p) if p else float("-inf") for p in PROBS]] * n)


def test_rows_draw_from_their_distribution_reproducibly():
    n = 4000
    tokens, _, ok = sample(logits(n), rows(n, temperature=1.0))
    assert all(ok)
    freq = torch.bincount(tokens, minlength=len(PROBS)).float() / n
    assert torch.allclose(freq, torch.tensor(PROBS), atol=0.03)
    # Each row depends only on its own seed: the same seeds in another batch order give the same tokens.
    again, _, _ = sample(logits(n).flip(0), rows(n, temperature=1.0)[::-1])
    assert again.flip(0).tolist() == tokens.tolist()


def test_top_k_and_top_p_never_let_filtered_tokens_through():
    n = 2000
    tokens, _, _ = sample(logits(n), rows(n, temperature=1.0, top_k=2))
    assert set(tokens.tolist()) == {0, 1}
    # Mass before token 1 is 0.5 < 0.6: kept; before token 2 it is 0.8 >= 0.6: dropped.
    tokens, _, _ = sample(logits(n), rows(n, temperature=1.0, top_p=0.6))
    assert set(tokens.tolist()) == {0, 1}


def test_logprobs_are_of_the_unmodified_distribution_and_bad_rows_are_flagged_alone():
    batch = rows(3, temperature=0.5, return_logprobs=True)
    scores = logits(3)
    scores[1, 0] = float("nan")
    tokens, chosen, ok = sample(scores, batch)
    assert ok == [True, False, True]
    for i in (0, 2):
        assert chosen[i] == pytest.approx(torch.log_softmax(logits(1)[0], -1)[tokens[i]].item(), abs=1e-6)
    # Sampling at temperature 1e-45 (validation refuses it; a trainer may build it) overflows to NaN.
    tokens, _, ok = sample(logits(2), [*rows(1, temperature=1e-45), *rows(1, seed0=9, temperature=1.0)])
    assert ok == [False, True] and tokens[1].item() in (0, 1, 2)


def test_a_nucleus_wider_than_the_candidates_is_still_exact():
    """A flat distribution's 90% nucleus spans ~900 of 1000 tokens, more than the top-k shortcut
    looks at: the sampler falls back to the full sort and still never leaves the nucleus."""
    n, vocab = 400, 1000
    scores = (-0.001 * torch.arange(vocab, dtype=torch.float32)).repeat(n, 1)
    probs = scores[0].softmax(-1)
    nucleus = int(((probs.cumsum(-1) - probs) < 0.9).sum())
    assert nucleus > 256
    tokens, _, ok = sample(scores, rows(n, temperature=1.0, top_p=0.9))
    assert all(ok) and int(tokens.max()) < nucleus and int(tokens.max()) > 256


def test_greedy_batches_pick_the_argmax_and_still_flag_bad_rows_and_apply_penalties():
    """Plain greedy batches take a shortcut (no logsumexp, no copies): same tokens, same checks."""
    scores = torch.randn(6, 50)
    scores[1, [7, 30]] = scores[1].max() + 1  # a tie: the first index wins, as with argmax
    tokens, chosen, ok = sample(scores, rows(6, temperature=0.0))
    assert tokens[1].item() == 7
    assert tokens.tolist() == scores.argmax(-1).tolist() and chosen is None and ok == [True] * 6
    for bad in (float("nan"), float("inf")):
        broken = scores.clone()
        broken[2, 7] = bad
        tokens, _, ok = sample(broken, rows(6, temperature=0.0))
        assert ok == [True, True, False, True, True, True]
        assert tokens[[0, 1, 3, 4, 5]].tolist() == scores.argmax(-1)[[0, 1, 3, 4, 5]].tolist()
    everything_ruled_out = scores.clone()
    everything_ruled_out[4] = float("-inf")
    _, _, ok = sample(everything_ruled_out, rows(6, temperature=0.0))
    assert ok == [True, True, True, True, False, True]
    # A repetition penalty still applies to a greedy row: prompt token 1 (seen) loses to token 3.
    peaked = torch.full((1, 50), -5.0)
    peaked[0, 1], peaked[0, 3] = 2.0, 1.5
    tokens, _, _ = sample(peaked.clone(), rows(1, temperature=0.0, repetition_penalty=2.0))
    assert tokens.tolist() == [3]
    tokens, _, _ = sample(peaked, rows(1, temperature=0.0))
    assert tokens.tolist() == [1]
