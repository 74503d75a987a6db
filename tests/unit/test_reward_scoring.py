"""Reward scores are read at the response's last real token (EOS included) and
never depend on padding side or on what else shares the batch."""

from __future__ import annotations

import random

import pytest
import torch

from services.common.checkpoints import Manifest
from services.common.config import load_settings
from services.common.hotswap import Loaded
from services.common.models import RewardModel, encode_prompt_response, load_tokenizer, render_prompt
from services.reward.server import Scorer, _Job, score_sequences

RESPONSES = [
    "Yes.",
    "The sea is wide and deep, and the waves roll on forever.",
    "",
    "No, I don't think so at all, sorry!",
    "4",
]


@pytest.fixture(scope="module")
def rm(tiny_model_dir):
    torch.manual_seed(0)
    model = RewardModel.from_causal_lm(tiny_model_dir).eval()
    tok = load_tokenizer(tiny_model_dir)
    prompt = render_prompt(tok, "Say something about the sea.")
    seqs = [encode_prompt_response(tok, prompt, r, 256) for r in RESPONSES]
    return model, tok, seqs


def test_score_is_the_value_at_the_eos_token(rm):
    model, tok, seqs = rm
    for seq in seqs:
        assert seq[-1] == tok.eos_token_id
        ids = torch.tensor([seq])
        with torch.inference_mode():
            values = model(ids, torch.ones_like(ids))
        assert score_sequences(model, [seq], tok.pad_token_id)[0] == pytest.approx(float(values[0, -1]), abs=1e-5)


def test_padding_side_and_batch_composition_do_not_change_scores(rm):
    model, tok, seqs = rm
    alone = [score_sequences(model, [s], tok.pad_token_id)[0] for s in seqs]
    right = score_sequences(model, seqs, tok.pad_token_id, side="right")
    left = score_sequences(model, seqs, tok.pad_token_id, side="left")
    order = list(range(len(seqs)))
    random.Random(1).shuffle(order)
    shuffled = score_sequences(model, [seqs[i] for i in order], tok.pad_token_id, side="left")
    assert right == pytest.approx(alone, abs=1e-4)
    assert left == pytest.approx(alone, abs=1e-4)
    assert [shuffled[order.index(i)] for i in range(len(seqs))] == pytest.approx(alone, abs=1e-4)
    assert len({round(a, 4) for a in alone}) == len(alone)  # distinct responses, distinct scores: the test can fail


def test_scorer_batches_across_requests_without_changing_scores(rm):
    model, tok, seqs = rm
    loaded = Loaded("rm-v", Manifest("rm-v", "rm", "reward"), None, model, tok)
    alone = [score_sequences(model, [s], tok.pad_token_id)[0] for s in seqs]
    for batch in ("1", "3", "16"):
        scorer = Scorer(load_settings({"RLHF_REWARD_BATCH": batch}))
        try:
            jobs = [_Job(loaded, seqs[:2], None), _Job(loaded, seqs[2:], None), _Job(loaded, seqs[::-1], None)]
            for job in jobs:
                scorer.submit(job)
            for job in jobs:
                assert job.done.wait(30) and job.error is None
            assert jobs[0].scores + jobs[1].scores == pytest.approx(alone, abs=1e-4)
            assert jobs[2].scores == pytest.approx(alone[::-1], abs=1e-4)
            assert scorer.forward_passes >= -(-len(seqs) // int(batch))
        finally:
            scorer.stop()
