"""RM scoring and pairwise accuracy (services/common/rm_scoring.py), shared by the gate
job and the demo's reports."""

from __future__ import annotations

import math

import pytest
import torch

from services.common.models import RewardModel, encode_prompt_response, load_tokenizer, render_prompt
from services.common.rm_scoring import comparison_scores, pair_accuracy, score_texts


def _cmp(ranks: list[int]) -> dict:
    return {"prompt_text": "p", "responses": [{"text": str(i), "rank": r} for i, r in enumerate(ranks)]}


def test_pair_accuracy_counts_non_tie_pairs_and_halves_equal_scores():
    comparisons = [_cmp([1, 2, 3]), _cmp([1, 1, 2])]
    # first: (0,1) right, (0,2) right, (1,2) wrong; second: (0,1) a tie (dropped), (0,2) equal scores, (1,2) right
    scores = [[3.0, 1.0, 2.0], [0.5, 0.7, 0.5]]
    acc = pair_accuracy(comparisons, scores)
    assert acc["pairs"] == 5 and acc["correct"] == 3.5 and acc["accuracy"] == pytest.approx(0.7)
    assert acc["comparisons"] == 2
    assert math.isnan(pair_accuracy([_cmp([1, 1])], [[0.0, 1.0]])["accuracy"])
    with pytest.raises(ValueError, match="1 score lists for 2 comparisons"):
        pair_accuracy(comparisons, scores[:1])


def test_batched_scores_come_back_in_order_and_equal_one_at_a_time(tiny_model_dir):
    torch.manual_seed(0)
    rm, tok = RewardModel.from_causal_lm(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    pairs = [("Say hi.", "hi " * n) for n in (9, 1, 5, 0, 3)] + [("Name a colour.", "blue")]
    batched = score_texts(rm, tok, pairs, "cpu", batch=4)
    for (prompt, response), got in zip(pairs, batched, strict=True):
        ids = torch.tensor([encode_prompt_response(tok, render_prompt(tok, prompt), response, 512)])
        with torch.no_grad():
            alone = float(rm.score(ids, torch.ones_like(ids)))
        assert got == pytest.approx(alone, abs=1e-4)
    assert len(set(batched)) > 1
    comparisons = [{"prompt_text": p, "responses": [{"text": r, "rank": 1}]} for p, r in pairs]
    assert [s[0] for s in comparison_scores(rm, tok, comparisons, "cpu", batch=3)] == pytest.approx(batched, abs=1e-4)


def _count_rows(rm, monkeypatch) -> list[int]:
    """Rows the RM runs: whole sequences, and responses after a shared prompt."""
    rows = []
    score, after = rm.score, rm.score_after_prefixes
    monkeypatch.setattr(rm, "score", lambda ids, mask: rows.append(len(ids)) or score(ids, mask))
    monkeypatch.setattr(rm, "score_after_prefixes", lambda p, s, o, pad: rows.append(len(s)) or after(p, s, o, pad))
    return rows


def test_a_repeated_pair_is_scored_once_and_every_caller_position_gets_its_score(tiny_model_dir, monkeypatch):
    torch.manual_seed(0)
    rm, tok = RewardModel.from_causal_lm(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    pairs = [("Say hi.", "hi"), ("Say hi.", "hello there"), ("Say hi.", "hi"), ("Name a colour.", "blue")]
    expected = score_texts(rm, tok, pairs[:2] + pairs[3:], "cpu", batch=8)
    rows = _count_rows(rm, monkeypatch)
    # a task two labelers ranked: the same comparison twice
    comparison = {"prompt_text": "Say hi.", "responses": [{"text": "hi", "rank": 1}, {"text": "yo", "rank": 2}]}
    got = comparison_scores(rm, tok, [comparison, comparison], "cpu", batch=8)
    assert sum(rows) == 2 and got[0] == got[1]
    rows.clear()
    scores = score_texts(rm, tok, pairs, "cpu", batch=8)
    assert sum(rows) == 3
    assert scores == pytest.approx([expected[0], expected[1], expected[0], expected[2]], abs=1e-4)


def test_responses_to_one_prompt_share_its_pass_and_score_as_whole_sequences(tiny_model_dir, monkeypatch):
    torch.manual_seed(0)
    rm, tok = RewardModel.from_causal_lm(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    long_prompt = "Describe the ocean in at most 12 words, please, and include the word waves. " * 3
    pairs = [
        (long_prompt, "The ocean is big."),
        ("Say hi.", "hi"),
        (long_prompt, "Waves."),
        ("Say hi.", "hello there, my good friend"),
        ("Name a colour.", "blue"),  # one response: a whole sequence
        (long_prompt, "Salt water everywhere, deep and cold."),
    ]

    def alone(prompt, response, max_tokens=512):
        ids = torch.tensor([encode_prompt_response(tok, render_prompt(tok, prompt), response, max_tokens)])
        with torch.no_grad():
            return float(rm.score(ids, torch.ones_like(ids)))

    expected = [alone(p, r) for p, r in pairs]
    expected_cut = [alone(p, r, 24) for p, r in pairs]
    rows = _count_rows(rm, monkeypatch)
    # batch 4: the short prompt's 2 responses and the long one's 3 cannot share one pass
    got = score_texts(rm, tok, pairs, "cpu", batch=4)
    assert got == pytest.approx(expected, abs=1e-4)
    assert sorted(rows) == [1, 2, 3]  # one whole sequence, two shared passes
    # a prompt cut from the left by max_tokens is not a shared prefix: whole sequences, cut the same way
    # (at 24 tokens every prompt here is cut: the chat template alone is longer)
    rows.clear()
    got = score_texts(rm, tok, pairs, "cpu", batch=16, max_tokens=24)
    assert got == pytest.approx(expected_cut, abs=1e-4)
    assert rows == [6]
