"""PPO and PPO-ptx (InstructGPT step 3).

    python -m trainers.ppo --snapshot ID --sft VERSION --reward VERSION [--init VERSION]
                           --run-dir DIR --result-file F.json [--preset ...] [--set key=value ...]

Models: the policy starts from --init (default: the SFT model); the reference
is the frozen SFT model; the value function starts from the reward model (a
RewardModel whose per-token outputs are values); the reward model is frozen.

One PPO step:
  1. sample responses to a batch of train prompts from the policy;
  2. score each with the RM at its last real token (EOS included) and subtract
     the per-token KL penalty  β · (log π(y_t) − log π_ref(y_t));
  3. GAE (γ = 1, λ configurable) on the values, advantages whitened;
  4. `ppo_epochs` passes of minibatch updates with the clipped policy loss and
     the clipped value loss (clip 0.2), plus for PPO-ptx γ_ptx × the LM loss
     on pretraining-like text.

PPO-ptx text: `ptx_source = "demonstrations"` uses the snapshot's train
demonstrations as plain text (prompt, blank line, response: no chat
template), the closest thing to pretraining data this platform collects;
any other value is a UTF-8 text file whose blank-line-separated paragraphs
are the documents. γ_ptx is off in the tiny and cpu presets.

The rollout, log-prob and KL functions here are what trainers/evaluate.py
uses for the gate, so training and gating measure the same quantities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from services.common.models import (
    RewardModel,
    encode_prompts,
    last_token_index,
    load_causal_lm,
    load_tokenizer,
    position_ids_from_mask,
)
from trainers.config import JobError, TrainConfig, require
from trainers.job import Job, epoch_order, global_batch, peak_rss_gb, run_main, step_seed
from trainers.nn import (
    WeightEMA,
    add_lora,
    all_reduce_,
    autocast,
    load_trainable_state,
    merge_lora,
    sum_over_ranks,
    trainable_state,
    unwrap,
)
from trainers.report import markdown_report
from trainers.rollout import ROLLOUT_ENGINES, EngineRollouts, Rollouts, generate_rollouts, rollout_seeds
from trainers.sft import collate, lm_loss_sum


@dataclass
class PPOConfig(TrainConfig):
    """PPO / PPO-ptx against a reward model with a per-token KL penalty.

    Rollouts: total_steps (PPO steps), rollout_batch_size (prompts per step,
              global), rollout_engine ("engine": the policy service's
              continuous-batching engine on the live policy, the whole local
              batch at once; "hf": transformers' generate in static batches),
              generation_batch_size (sequences per generate call with "hf", and
              per scoring forward with both), max_prompt_tokens, max_new_tokens,
              temperature, reuse_rollout_logprobs (take π_old from the engine's
              sampled-token log-probs instead of one more policy forward, where
              they are the same quantity: engine rollouts, fp32, temperature 1).
    Reward:   kl_beta (β), adaptive_kl (adjust β toward kl_target nats per
              response over kl_horizon rollouts; Ziegler et al.), kl_target,
              kl_horizon, missing_eos_penalty (subtracted from the score of a
              response that never emitted EOS; 0 = off).
    PPO:      ppo_epochs, mini_batch_size (rollouts per update, global), gamma,
              lam, whiten_advantages, clip_range, value_clip_range, vf_coef, lr,
              value_lr (both constant), max_grad_norm (shared).
    PPO-ptx:  ptx_coef (γ_ptx; the paper 27.8; 0 = plain PPO), ptx_source
              ("demonstrations" or a text file), ptx_batch_size, ptx_max_tokens.
    Model:    shared (trainers/config.py): lora_rank (0 = full fine-tuning),
              lora_alpha, lora_dropout, lora_targets (policy and value);
              dtype (auto: bf16 autocast only where bf16 is native, else fp32).
    EMA:      ema_decay: publish an exponential moving average of the policy's
              trainable weights, updated after every optimizer step (the paper
              0.992; 0 = publish the last weights). With LoRA the average is
              over the adapter matrices.
    Job:      save_every (steps between resume points), seed (shared).
    """

    total_steps: int = 20
    rollout_batch_size: int = 16
    rollout_engine: str = "engine"
    reuse_rollout_logprobs: bool = True
    generation_batch_size: int = 8
    max_prompt_tokens: int = 256
    max_new_tokens: int = 64
    temperature: float = 1.0
    kl_beta: float = 0.02
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    missing_eos_penalty: float = 0.0
    ppo_epochs: int = 1
    mini_batch_size: int = 8
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    vf_coef: float = 0.5
    lr: float = 1e-6
    value_lr: float = 5e-6
    ptx_coef: float = 0.0
    ptx_source: str = "demonstrations"
    ptx_batch_size: int = 4
    ptx_max_tokens: int = 256
    ema_decay: float = 0.0
    save_every: int = 5

    def validate(self) -> None:
        require(0 <= self.ema_decay < 1, f"ema_decay={self.ema_decay} must be in [0, 1) (0 = off)")
        require(self.total_steps >= 1, f"total_steps={self.total_steps} must be at least 1")
        require(
            self.rollout_batch_size >= 1 and self.mini_batch_size >= 1 and self.generation_batch_size >= 1,
            "rollout_batch_size, mini_batch_size and generation_batch_size must be at least 1",
        )
        require(
            self.mini_batch_size <= self.rollout_batch_size,
            f"mini_batch_size={self.mini_batch_size} exceeds rollout_batch_size={self.rollout_batch_size}",
        )
        require(
            self.rollout_engine in ROLLOUT_ENGINES,
            f"rollout_engine={self.rollout_engine!r} must be one of {', '.join(ROLLOUT_ENGINES)}",
        )
        require(1 <= self.max_new_tokens <= 4096, f"max_new_tokens={self.max_new_tokens} must be in 1..4096")
        require(self.temperature > 0, f"temperature={self.temperature} must be positive")
        require(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam must be in [0, 1]")
        require(self.clip_range > 0 and self.value_clip_range > 0, "clip_range and value_clip_range must be positive")
        require(self.kl_beta >= 0, f"kl_beta={self.kl_beta} must be >= 0")
        require(not self.adaptive_kl or self.kl_target > 0, "adaptive_kl needs kl_target > 0")
        require(self.ptx_coef >= 0, f"ptx_coef={self.ptx_coef} must be >= 0")
        super().validate()


PRESETS = {
    "tiny": dict(
        total_steps=4,
        rollout_batch_size=4,
        generation_batch_size=4,
        mini_batch_size=2,
        max_prompt_tokens=48,
        max_new_tokens=12,
        lr=1e-3,
        value_lr=1e-3,
        lora_rank=4,
        ptx_batch_size=2,
        ptx_max_tokens=48,
        ema_decay=0.5,
        save_every=1,
        dtype="float32",  # tests give the same numbers on every CPU
    ),
    # All four 135M models on 2 cores in a few minutes: LoRA, bf16 where native, short responses.
    "cpu": dict(
        total_steps=6,
        rollout_batch_size=8,
        generation_batch_size=8,
        mini_batch_size=4,
        max_prompt_tokens=96,
        max_new_tokens=32,
        lr=5e-5,
        value_lr=1e-4,
        lora_rank=8,
        save_every=2,
    ),
    # The paper: batch 512, minibatch 64, 1 inner epoch, β 0.02, γ_ptx 27.8; scaled to one GPU.
    "gpu": dict(
        total_steps=200,
        rollout_batch_size=128,
        generation_batch_size=64,
        mini_batch_size=32,
        max_prompt_tokens=512,
        max_new_tokens=256,
        lr=1e-6,
        value_lr=5e-6,
        ptx_coef=27.8,
        ptx_batch_size=8,
        ptx_max_tokens=512,
        ema_decay=0.992,
        save_every=10,
    ),
}


# --- the math (unit-tested against hand-computed values) ------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def kl_penalized_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: −β·(log π − log π_ref) on every real response token,
    plus the RM score on the response's LAST REAL token (found from the mask,
    so left or right padding of the response block changes nothing).
    Returns (rewards, per-token KL estimate), both zero on padding."""
    mask = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    last = last_token_index(mask)
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; padding carries
    no value and no reward, so the episode ends at the last real token."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    width = rewards.shape[1]
    for t in reversed(range(width)):
        next_value = values[:, t + 1] if t + 1 < width else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    returns = advantages + values
    return advantages * mask, returns * mask


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over real tokens (over all ranks when distributed)."""
    mask = mask.to(x.dtype)
    stats = all_reduce_(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double())
    n = stats[2].clamp(min=2)
    mean = stats[0] / n
    var = (stats[1] / n - mean**2) * n / (n - 1)
    return ((x - mean.to(x.dtype)) * torch.rsqrt(var.to(x.dtype) + 1e-8)) * mask


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)); returns (loss, clip fraction)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    return masked_mean(torch.maximum(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """½·max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²); returns (loss, clip fraction)."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask), masked_mean(
        (clipped_err > unclipped_err).float(), mask
    )


class AdaptiveKL:
    """β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon) (Ziegler et al. 2019)."""

    def __init__(self, beta: float, target: float, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> float:
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.beta *= 1 + error * n / self.horizon
        return self.beta


# --- rollouts (shared with trainers/evaluate.py) ----------------------------------------


def response_logprobs(
    model,
    ids: torch.Tensor,
    mask: torch.Tensor,
    prompt_width: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(y_t | x, y_<t) for every response position (and the entropy of π there)."""
    width = ids.shape[1] - prompt_width
    logits = (
        model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=False,
            logits_to_keep=width + 1,
        )
        .logits[:, :-1]
        .float()
        / temperature
    )
    logp = torch.log_softmax(logits, -1)
    token_logp = logp.gather(-1, ids[:, prompt_width:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1) if with_entropy else None
    return token_logp, entropy


def response_values(value_model, ids: torch.Tensor, mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """V(state before response token t), from the value head's per-token outputs."""
    return value_model(ids, mask)[:, prompt_width - 1 : -1].float()


@torch.no_grad()
def rollout_stats(
    policy,
    reference,
    reward_model,
    rollouts: Rollouts,
    temperature: float,
    batch_size: int,
    device: str,
    bf16: bool = False,
    policy_logprobs: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Log-probs under policy and reference, per-token KL and RM scores, in chunks.
    `policy_logprobs`: the policy's, already known (from the sampler); not recomputed."""
    out: dict[str, list[torch.Tensor]] = {"logprobs": [], "ref_logprobs": [], "scores": []}
    for i in range(0, len(rollouts.ids), batch_size):
        ids, mask = rollouts.ids[i : i + batch_size], rollouts.mask[i : i + batch_size]
        with autocast(device, bf16):
            if policy_logprobs is None:
                logp = response_logprobs(unwrap(policy), ids, mask, rollouts.prompt_width, temperature)[0]
                out["logprobs"].append(logp)
            else:
                out["logprobs"].append(policy_logprobs[i : i + batch_size])
            out["ref_logprobs"].append(response_logprobs(reference, ids, mask, rollouts.prompt_width, temperature)[0])
            out["scores"].append(reward_model.score(ids, mask).float())
    stats = {k: torch.cat(v) for k, v in out.items()}
    stats["kl"] = (stats["logprobs"] - stats["ref_logprobs"]) * rollouts.response_mask
    return stats


def prompt_texts(job: Job, snapshot: str, split: str) -> list[str]:
    """A split's prompts: the prompt records, else the prompts of demonstrations and comparisons."""
    texts = [r["text"] for r in job.read(snapshot, split, "prompts")]
    if not texts:
        texts = [
            r["prompt_text"] for kind in ("demonstrations", "comparisons") for r in job.read(snapshot, split, kind)
        ]
    return list(dict.fromkeys(t for t in texts if t.strip()))


def ptx_documents(job: Job, cfg: PPOConfig, snapshot: str, tokenizer) -> list[tuple[list[int], int]]:
    """PPO-ptx documents as (ids, 0): every token is a target, as in pretraining."""
    if cfg.ptx_source == "demonstrations":
        texts = [f"{d['prompt_text']}\n\n{d['response']}" for d in job.read(snapshot, "train", "demonstrations")]
    else:
        path = Path(cfg.ptx_source)
        if not path.is_file():
            raise JobError(f"ptx_source={cfg.ptx_source!r} is neither 'demonstrations' nor a readable text file")
        texts = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    docs = [(tokenizer(t, add_special_tokens=False).input_ids[: cfg.ptx_max_tokens], 0) for t in texts]
    docs = [d for d in docs if len(d[0]) >= 2]
    if not docs:
        raise JobError(f"ptx_coef={cfg.ptx_coef} but ptx_source={cfg.ptx_source!r} yields no text")
    return docs


def add_args(parser) -> None:
    parser.add_argument("--snapshot", required=True, help="dataset snapshot id (train prompts)")
    parser.add_argument("--sft", required=True, help="SFT checkpoint: the reference policy (and the initial policy)")
    parser.add_argument(
        "--reward", required=True, help="reward-model checkpoint: the reward and the value function's init"
    )
    parser.add_argument("--init", help="policy checkpoint to start from instead of --sft (e.g. the last PPO policy)")


def main(argv: list[str] | None = None) -> int:
    job = Job.start("ppo", PPOConfig, PRESETS, argv, add_args)
    cfg, args, device = job.cfg, job.args, job.device
    version = job.planned_version("ppo")
    require(
        cfg.rollout_batch_size % job.world == 0 and cfg.mini_batch_size % job.world == 0,
        f"rollout_batch_size and mini_batch_size must divide by the {job.world} processes",
    )

    # --- inputs -------------------------------------------------------------
    sft_path = job.checkpoint(args.sft, ("base", "sft", "ppo"), "--sft")
    reward_path = job.checkpoint(args.reward, ("rm",), "--reward")
    init_path = job.checkpoint(args.init, ("base", "sft", "ppo"), "--init") if args.init else sft_path
    tokenizer = load_tokenizer(init_path)
    prompts = prompt_texts(job, args.snapshot, "train")
    if not prompts:
        raise JobError(f"snapshot {args.snapshot} has no train prompts; PPO needs at least 1")
    ptx = ptx_documents(job, cfg, args.snapshot, tokenizer) if cfg.ptx_coef > 0 else []

    # --- models: policy and value train; reference and RM are frozen --------------------
    torch.manual_seed(cfg.seed)
    policy = load_causal_lm(init_path, device=device)
    value = RewardModel.from_pretrained(reward_path, device=device)
    if cfg.lora_rank > 0:
        policy = add_lora(policy, cfg)
        value.backbone = add_lora(value.backbone, cfg)
    reference = load_causal_lm(sft_path, device=device).requires_grad_(False)
    reward_model = RewardModel.from_pretrained(reward_path, device=device).requires_grad_(False)
    policy_params = [p for p in policy.parameters() if p.requires_grad]
    value_params = [p for p in value.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": policy_params, "lr": cfg.lr}, {"params": value_params, "lr": cfg.value_lr}], weight_decay=0.0
    )
    policy, value = job.wrap_ddp(policy), job.wrap_ddp(value)
    kl_control = AdaptiveKL(cfg.kl_beta, cfg.kl_target, cfg.kl_horizon)
    ema = WeightEMA(policy, cfg.ema_decay) if cfg.ema_decay > 0 else None

    start = 0
    state = job.load_state()
    if state:
        load_trainable_state(policy, state["policy"])
        load_trainable_state(value, state["value"])
        optimizer.load_state_dict(state["optimizer"])
        start, kl_control.beta = state["step"], state["beta"]
        if ema:
            ema.load_state_dict(state.get("ema") or {})

    # --- the loop ---------------------------------------------------------------
    local_rollouts = cfg.rollout_batch_size // job.world
    local_mini = cfg.mini_batch_size // job.world
    progress = tqdm(total=cfg.total_steps, initial=start, desc="ppo", disable=not job.is_main, dynamic_ncols=True)
    engine = None
    # The engine's sampled-token log-probs are π_old itself where both sides compute the same
    # thing (fp32, temperature 1: tests/unit/test_ppo_rollout.py); elsewhere the forward pass recomputes them.
    reuse_logprobs = cfg.rollout_engine == "engine" and cfg.reuse_rollout_logprobs and not job.bf16
    reuse_logprobs = reuse_logprobs and cfg.temperature == 1.0
    if cfg.rollout_engine == "engine":  # decodes with the live policy module: every update is seen at once
        engine = EngineRollouts(
            policy,
            tokenizer,
            job.settings,
            rows=local_rollouts,
            max_prompt_tokens=cfg.max_prompt_tokens,
            max_new_tokens=cfg.max_new_tokens,
            device=device,
            bf16=job.bf16,
        )
    for step in range(start, cfg.total_steps):
        step_seed(cfg.seed, job.rank, step)
        chosen = job.rank_slice(
            global_batch(
                lambda e: epoch_order(len(prompts), cfg.seed, e), len(prompts), cfg.rollout_batch_size, step, job.world
            )
        )
        chosen = (chosen * local_rollouts)[:local_rollouts]  # fewer prompts than a batch: repeat them
        # 1. rollouts and their rewards
        unwrap(policy).eval()
        prompt_ids = encode_prompts(tokenizer, [prompts[i] for i in chosen], cfg.max_prompt_tokens)
        if engine is not None:
            rollouts = engine.generate(prompt_ids, cfg.temperature, rollout_seeds(len(prompt_ids)))
        else:
            rollouts = generate_rollouts(
                policy,
                tokenizer,
                prompt_ids,
                cfg.max_new_tokens,
                cfg.temperature,
                cfg.generation_batch_size,
                device,
                job.bf16,
            )
        stats = rollout_stats(
            policy,
            reference,
            reward_model,
            rollouts,
            cfg.temperature,
            cfg.generation_batch_size,
            device,
            job.bf16,
            rollouts.sampler_logprobs if reuse_logprobs else None,
        )
        rmask = rollouts.response_mask
        scores = stats["scores"] - cfg.missing_eos_penalty * (~rollouts.has_eos).float()
        with torch.no_grad(), autocast(device, job.bf16):
            old_values = torch.cat(
                [
                    response_values(
                        unwrap(value),
                        rollouts.ids[i : i + cfg.generation_batch_size],
                        rollouts.mask[i : i + cfg.generation_batch_size],
                        rollouts.prompt_width,
                    )
                    for i in range(0, local_rollouts, cfg.generation_batch_size)
                ]
            )
        rewards, kl = kl_penalized_rewards(scores, stats["logprobs"], stats["ref_logprobs"], rmask, kl_control.beta)
        advantages, returns = gae(rewards, old_values, rmask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, rmask)

        # 2. PPO updates on minibatches
        unwrap(policy).train()
        sums = {
            "policy_loss": 0.0,
            "value_loss": 0.0,
            "clip_fraction": 0.0,
            "value_clip_fraction": 0.0,
            "entropy": 0.0,
            "ptx_loss": 0.0,
        }
        updates = 0
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(local_rollouts).tolist()
            for first in range(0, local_rollouts, local_mini):
                mb = order[first : first + local_mini]
                ids, mask, mb_mask = rollouts.ids[mb], rollouts.mask[mb], rmask[mb]
                with autocast(device, job.bf16):
                    logp, entropy = response_logprobs(
                        policy, ids, mask, rollouts.prompt_width, cfg.temperature, with_entropy=True
                    )
                    new_values = response_values(value, ids, mask, rollouts.prompt_width)
                pg_loss, clip_frac = clipped_policy_loss(
                    logp, stats["logprobs"][mb], advantages[mb], mb_mask, cfg.clip_range
                )
                vf_loss, vclip_frac = clipped_value_loss(
                    new_values, old_values[mb], returns[mb], mb_mask, cfg.value_clip_range
                )
                optimizer.zero_grad(set_to_none=True)
                (pg_loss + cfg.vf_coef * vf_loss).backward()
                if ptx:  # its own forward/backward pair, which DDP allows; gradients add up
                    update_index = (step * cfg.ppo_epochs + epoch) * math.ceil(
                        local_rollouts / local_mini
                    ) + first // local_mini
                    docs = job.rank_slice(
                        global_batch(
                            lambda e: epoch_order(len(ptx), cfg.seed + 1, e),
                            len(ptx),
                            cfg.ptx_batch_size * job.world,
                            update_index,
                        )
                    )
                    ptx_ids, ptx_mask, ptx_labels = (
                        t.to(device) for t in collate([ptx[i] for i in docs], tokenizer.pad_token_id)
                    )
                    with autocast(device, job.bf16):
                        ptx_sum, ptx_count = lm_loss_sum(policy, ptx_ids, ptx_mask, ptx_labels)
                    (cfg.ptx_coef * ptx_sum / max(1, ptx_count)).backward()
                    sums["ptx_loss"] += ptx_sum.item() / max(1, ptx_count)
                torch.nn.utils.clip_grad_norm_(policy_params + value_params, cfg.max_grad_norm)
                optimizer.step()
                if ema:
                    ema.update(policy)
                updates += 1
                for key, val in (
                    ("policy_loss", pg_loss),
                    ("value_loss", vf_loss),
                    ("clip_fraction", clip_frac),
                    ("value_clip_fraction", vclip_frac),
                    ("entropy", masked_mean(entropy.detach(), mb_mask)),
                ):
                    sums[key] += val.item()

        # 3. metrics (over all ranks), adaptive β
        lengths = rmask.sum(1).float()
        totals = all_reduce_(
            torch.tensor(
                [
                    float(stats["scores"].sum()),
                    float(kl.sum()),
                    float(lengths.sum()),
                    float((~rollouts.has_eos).sum()),
                    float(len(lengths)),
                ],
                dtype=torch.float64,
                device=device,
            )
        )
        n = float(totals[4])
        metrics = {
            "reward_score": float(totals[0]) / n,
            "kl": float(totals[1]) / n,
            "response_length": float(totals[2]) / n,
            "no_eos_fraction": float(totals[3]) / n,
            "beta": kl_control.beta,
        }
        means = sum_over_ranks(
            [v / max(1, updates) for v in sums.values()], device
        )  # every rank's updates, not rank 0's
        metrics.update({k: v / job.world for k, v in zip(sums, means, strict=True) if k != "ptx_loss" or ptx})
        if cfg.adaptive_kl:
            kl_control.update(metrics["kl"], int(n))
        job.log(step, metrics, progress)
        progress.update(1)
        done = step + 1
        if done % cfg.save_every == 0 or done == cfg.total_steps:
            job.save_state(
                done,
                policy=trainable_state(policy),
                value=trainable_state(value),
                optimizer=optimizer.state_dict(),
                beta=kl_control.beta,
                ema=ema.state_dict() if ema else None,
            )
    progress.close()
    if engine is not None:
        engine.close()

    # --- publish the policy (LoRA merged) ----------------------------------------------
    history = job.metrics_history() or job.records
    last = history[-1] if history else {}
    summary = {
        "steps": cfg.total_steps,
        "train_prompts": len(prompts),
        "final_beta": kl_control.beta,
        "peak_rss_gb": round(peak_rss_gb(), 2),
        **{
            k: last[k]
            for k in ("reward_score", "kl", "entropy", "clip_fraction", "value_loss", "response_length")
            if k in last
        },
    }
    if history:
        summary["first_reward_score"] = history[0].get("reward_score")
    summary["ema_decay"] = cfg.ema_decay  # > 0: the published weights are the EMA, not the last iterate
    if ema:
        ema.copy_to(policy)
    merged = merge_lora(unwrap(policy))

    def write(folder):
        merged.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    parents = list(dict.fromkeys([args.init or args.sft, args.sft, args.reward]))
    announced = job.publish("ppo", version, write, parents=parents, snapshot=args.snapshot, metrics=summary)
    job.finish(
        {"version": version, "kind": "ppo", "metrics": summary, "announced": announced},
        curves=[
            "reward_score",
            "kl",
            "entropy",
            "clip_fraction",
            "value_loss",
            "response_length",
            "policy_loss",
            "beta",
            "ptx_loss",
        ],
        report=markdown_report(
            f"PPO run {version}",
            summary,
            cfg,
            notes=f"Snapshot `{args.snapshot}`; reference SFT `{args.sft}`; reward `{args.reward}`; "
            f"PPO-ptx {'on (γ_ptx=' + str(cfg.ptx_coef) + ')' if ptx else 'off'}.",
        ),
    )
    return 0


if __name__ == "__main__":
    run_main(main)
