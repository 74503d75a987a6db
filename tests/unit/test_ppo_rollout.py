"""PPO rollouts through the policy engine on the tiny model: the engine's
sampled-token log-probs equal the trainer's forward pass (left padding,
mixed prompt lengths, LoRA), the engine decodes with the live weights after
an update, seeds reach generation, and tokens after EOS are padding."""

from __future__ import annotations

import copy

import pytest
import torch

from services.common.config import load_settings
from services.common.models import RewardModel, encode_prompts, load_causal_lm, load_tokenizer
from trainers.config import TrainConfig
from trainers.nn import add_lora
from trainers.ppo import response_logprobs, rollout_stats
from trainers.rollout import EngineRollouts, assemble

PROMPTS = ["Hi", "Write a haiku about the sea.", "Tell me a long story about a dragon, a knight and a castle.", "Hi"]
MAX_NEW = 10
LORA = TrainConfig(lora_rank=4, lora_targets="q_proj,v_proj,up_proj")


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    torch.manual_seed(0)
    model = add_lora(load_causal_lm(tiny_model_dir), LORA)
    with torch.no_grad():  # a non-zero adapter, so the LoRA path changes the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def engine(policy, tokenizer):
    rollouts = EngineRollouts(
        policy,
        tokenizer,
        load_settings({}),
        rows=len(PROMPTS),
        max_prompt_tokens=48,
        max_new_tokens=MAX_NEW,
        device="cpu",
    )
    yield rollouts
    rollouts.close()


def trainer_logprobs(policy, rollouts) -> torch.Tensor:
    with torch.no_grad():
        logp, _ = response_logprobs(policy, rollouts.ids, rollouts.mask, rollouts.prompt_width)
    return logp * rollouts.response_mask


def test_engine_logprobs_match_the_training_forward_pass(policy, tokenizer, engine):
    prompt_ids = encode_prompts(tokenizer, PROMPTS, 48)
    assert len({len(p) for p in prompt_ids}) == 3  # different lengths: the batch is left-padded
    batches = engine.fused_batches
    rollouts = engine.generate(prompt_ids, 1.0, [11, 12, 13, 14])
    assert engine.fused_reason is None and engine.fused_batches == batches + 1  # the serving engine's fused step
    assert not hasattr(engine.offline.model, "rlhf_fused")  # its weight copies are not kept between batches
    assert rollouts.response_mask.sum() > len(PROMPTS)
    for row, ids in enumerate(prompt_ids):  # the prompt sits right-aligned before the response
        assert rollouts.ids[row, rollouts.prompt_width - len(ids) : rollouts.prompt_width].tolist() == ids
        assert rollouts.mask[row, : rollouts.prompt_width].sum() == len(ids)
    torch.testing.assert_close(rollouts.sampler_logprobs, trainer_logprobs(policy, rollouts), atol=2e-4, rtol=0)


def test_reused_sampler_logprobs_give_the_same_rollout_stats(policy, tokenizer, engine, tiny_model_dir):
    rollouts = engine.generate(encode_prompts(tokenizer, PROMPTS, 48), 1.0, [7, 8, 9, 10])
    reference = load_causal_lm(tiny_model_dir).eval()
    reward_model = RewardModel.from_causal_lm(tiny_model_dir).eval()
    with torch.no_grad():
        recomputed = rollout_stats(policy, reference, reward_model, rollouts, 1.0, 3, "cpu")
        reused = rollout_stats(
            policy, reference, reward_model, rollouts, 1.0, 3, "cpu", False, rollouts.sampler_logprobs
        )
    for key in ("logprobs", "kl"):
        got, want = reused[key] * rollouts.response_mask, recomputed[key] * rollouts.response_mask
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    torch.testing.assert_close(reused["scores"], recomputed["scores"])


def test_engine_decodes_with_the_updated_weights(policy, tokenizer, engine):
    prompt_ids = encode_prompts(tokenizer, PROMPTS[:2], 48)
    before = engine.generate(prompt_ids, 1.0, [5, 6])
    saved = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_B" in n}
    try:
        with torch.no_grad():  # an "optimizer step" on the live module, in place
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn_like(p) * 0.2)
        after = engine.generate(prompt_ids, 1.0, [5, 6])
        torch.testing.assert_close(after.sampler_logprobs, trainer_logprobs(policy, after), atol=2e-4, rtol=0)
        assert not torch.allclose(after.sampler_logprobs, before.sampler_logprobs)
    finally:
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if name in saved:
                    p.copy_(saved[name])


def test_seeds_reach_generation_and_a_sample_does_not_depend_on_its_batch(tokenizer, engine):
    prompt_ids = encode_prompts(tokenizer, PROMPTS[1:3], 48)
    first = engine.generate(prompt_ids, 1.0, [101, 202])
    again = engine.generate(prompt_ids, 1.0, [101, 202])
    other = engine.generate(prompt_ids, 1.0, [303, 404])
    alone = engine.generate(prompt_ids[1:], 1.0, [202])
    assert torch.equal(first.ids, again.ids)
    assert not torch.equal(first.ids[:, first.prompt_width :], other.ids[:, other.prompt_width :])
    width = first.prompt_width
    assert torch.equal(first.ids[1, width:], alone.ids[0, alone.prompt_width :])


def test_tokens_after_the_first_eos_are_padding():
    pad, eos = 0, 9
    responses = torch.tensor([[5, 9, 7, 9], [5, 6, 7, 8], [9, 3, 3, 3]])
    rollouts = assemble([[1, 2], [3]], responses[:2], pad, eos, "cpu")
    assert rollouts.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert rollouts.ids.tolist() == [[1, 2, 5, 9, 0, 0], [0, 3, 5, 6, 7, 8]]
    assert rollouts.has_eos.tolist() == [True, False]
    short = assemble(
        [[4], [5]], responses[[0, 2]], pad, eos, "cpu", torch.ones(2, 4)
    )  # columns of padding only: dropped
    assert short.ids.tolist() == [[4, 5, 9], [5, 9, 0]] and short.prompt_width == 1
    assert short.response_mask.tolist() == [[1, 1], [1, 0]] and short.sampler_logprobs.tolist() == [[1, 1], [1, 0]]


@pytest.mark.parametrize("lora", [True, False], ids=["LoRA", "full fine-tuning"])
def test_bf16_training_decodes_from_a_bf16_copy_that_follows_the_updates(tokenizer, tiny_model_dir, lora):
    """Under bf16 autocast on a CPU the engine decodes from a bf16 copy of the policy
    (so the fused step runs bf16 matmuls), refreshed from the live weights before
    every batch; its log-probs stay within bf16 rounding of the training forward."""
    torch.manual_seed(1)
    policy = load_causal_lm(tiny_model_dir)
    if lora:
        policy = add_lora(policy, LORA)
    policy.eval()
    trained = [p for n, p in policy.named_parameters() if ("lora_B" in n if lora else p.requires_grad)]
    rollouts = EngineRollouts(
        policy,
        tokenizer,
        load_settings({}),
        rows=3,
        max_prompt_tokens=48,
        max_new_tokens=MAX_NEW,
        device="cpu",
        bf16=True,
    )
    try:
        assert rollouts.fused_reason is None
        assert {p.dtype for p in rollouts.offline.model.parameters()} == {torch.bfloat16}
        assert all(p.dtype == torch.float32 for p in policy.parameters())  # the live model is left as it was
        prompt_ids = encode_prompts(tokenizer, PROMPTS[:3], 48)

        def gap(batch, model) -> float:  # mean |engine − training forward| over the response tokens
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                logp = trainer_logprobs(model, batch)
            return float((batch.sampler_logprobs - logp)[batch.response_mask.bool()].abs().mean())

        old = copy.deepcopy(policy)
        before = rollouts.generate(prompt_ids, 1.0, [1, 2, 3])
        with torch.no_grad():  # an "optimizer step" on the live module, in place
            for p in trained:
                p.add_(torch.randn_like(p) * (0.2 if lora else 0.05))
        after = rollouts.generate(prompt_ids, 1.0, [1, 2, 3])
        assert gap(before, old) < 0.02 and gap(after, policy) < 0.02
        assert gap(after, old) > 4 * gap(after, policy)  # it decoded with the update, not the old weights
    finally:
        rollouts.close()
