"""Gate evaluation: how a candidate policy scores and how far it moved.

    python -m trainers.evaluate --policy VERSION --reference VERSION --reward VERSION
                                --snapshot ID [--split validation] --result-file F.json
                                [--run-dir DIR] [--preset ...] [--set key=value ...]

Samples one response per prompt of the snapshot's split from --policy (a
fixed seed, so a re-run gives the same numbers), scores it with --reward at
its last real token, and sums the per-token KL estimate log π − log π_ref
over the response against --reference. The rollout and KL code is PPO's
(trainers/ppo.py), so the gate measures exactly what PPO optimised.

Result JSON: {"mean_reward", "kl_to_reference" (nats per response),
"kl_per_token", "n", "mean_response_length", "no_eos_fraction", ...}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from services.common.models import RewardModel, encode_prompts, load_causal_lm, load_tokenizer
from trainers.config import JobError, require
from trainers.job import Job, run_main, step_seed
from trainers.ppo import generate_rollouts, prompt_texts, rollout_stats


@dataclass
class EvalConfig:
    """Gate evaluation of a policy against a reference and a reward model.

    Data:       max_prompts (taken in the split's order), max_prompt_tokens.
    Generation: max_new_tokens, temperature (sampling, as PPO samples),
                batch_size, seed, dtype (auto: bf16 only where native).
    """

    max_prompts: int = 64
    max_prompt_tokens: int = 256
    max_new_tokens: int = 64
    temperature: float = 1.0
    batch_size: int = 8
    seed: int = 1234
    dtype: str = "auto"

    def validate(self) -> None:
        require(self.max_prompts >= 1, f"max_prompts={self.max_prompts} must be at least 1")
        require(1 <= self.max_new_tokens <= 4096, f"max_new_tokens={self.max_new_tokens} must be in 1..4096")
        require(self.temperature > 0, f"temperature={self.temperature} must be positive")
        require(self.batch_size >= 1, f"batch_size={self.batch_size} must be at least 1")


PRESETS = {
    "tiny": dict(max_prompts=8, max_prompt_tokens=48, max_new_tokens=12, batch_size=8, dtype="float32"),
    "cpu": dict(max_prompts=16, max_prompt_tokens=96, max_new_tokens=32, batch_size=8),
    "gpu": dict(max_prompts=512, max_prompt_tokens=512, max_new_tokens=256, batch_size=64),
}


def add_args(parser) -> None:
    parser.add_argument("--policy", required=True, help="candidate policy checkpoint")
    parser.add_argument("--reference", required=True, help="reference policy (the SFT model) for the KL")
    parser.add_argument("--reward", required=True, help="reward-model checkpoint")
    parser.add_argument("--snapshot", required=True, help="dataset snapshot id")
    parser.add_argument("--split", default="validation", choices=("train", "validation", "test"))


def main(argv: list[str] | None = None) -> int:
    job = Job.start("evaluate", EvalConfig, PRESETS, argv, add_args, run_dir=False)
    cfg, args, device = job.cfg, job.args, job.device
    policy_path = job.checkpoint(args.policy, ("base", "sft", "ppo"), "--policy")
    reference_path = job.checkpoint(args.reference, ("base", "sft", "ppo"), "--reference")
    reward_path = job.checkpoint(args.reward, ("rm",), "--reward")
    prompts = prompt_texts(job, args.snapshot, args.split)[: cfg.max_prompts]
    if not prompts:
        raise JobError(f"snapshot {args.snapshot} has no {args.split} prompts to evaluate on")

    tokenizer = load_tokenizer(policy_path)
    policy = load_causal_lm(policy_path, device=device)
    reference = load_causal_lm(reference_path, device=device)
    reward_model = RewardModel.from_pretrained(reward_path, device=device)
    step_seed(cfg.seed, 0, 0)
    rollouts = generate_rollouts(
        policy,
        tokenizer,
        encode_prompts(tokenizer, prompts, cfg.max_prompt_tokens),
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.batch_size,
        device,
        job.bf16,
    )
    stats = rollout_stats(policy, reference, reward_model, rollouts, cfg.temperature, cfg.batch_size, device, job.bf16)

    lengths = rollouts.response_mask.sum(1).float()
    kl_per_response = stats["kl"].sum(1)
    scores = stats["scores"]
    result = {
        "mean_reward": float(scores.mean()),
        "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
        "kl_to_reference": float(kl_per_response.mean()),
        "kl_per_token": float(stats["kl"].sum() / lengths.sum().clamp(min=1)),
        "n": len(prompts),
        "mean_response_length": float(lengths.mean()),
        "no_eos_fraction": float((~rollouts.has_eos).float().mean()),
        "policy": args.policy,
        "reference": args.reference,
        "reward": args.reward,
        "snapshot": args.snapshot,
        "split": args.split,
        "seed": cfg.seed,
    }
    if job.run_dir is not None and job.is_main:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        width = rollouts.prompt_width
        with open(job.run_dir / "samples.jsonl", "w") as fh:
            for i, prompt in enumerate(prompts):
                response_ids = rollouts.ids[i, width:][rollouts.response_mask[i].bool()].tolist()
                fh.write(
                    json.dumps(
                        {
                            "prompt": prompt,
                            "response": tokenizer.decode(response_ids, skip_special_tokens=True),
                            "score": float(scores[i]),
                            "kl": float(kl_per_response[i]),
                        }
                    )
                    + "\n"
                )
        rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in result.items())
        (job.run_dir / "report.md").write_text(
            f"# Gate evaluation of {args.policy}\n\n| metric | value |\n|---|---|\n{rows}\n\n"
            "Samples: `samples.jsonl` (prompt, response, score, KL).\n"
        )
    job.finish(result)
    return 0


if __name__ == "__main__":
    run_main(main)
