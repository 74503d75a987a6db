"""`python -m bench.ppo [--quick]`: PPO episodes per second of our trainer
(`python -m trainers.ppo`) against TRL 0.29.1's PPOTrainer
(`trl.experimental.ppo`), same run, same models, same prompts, same sizes.

Both sides get:
- the same SFT policy folder and the same reward model (a fresh scalar head
  on the SFT backbone, seeded; TRL gets it copied into `score`), which also
  initialises the value function, as InstructGPT does;
- the same chat-templated prompt token ids (synthetic train prompts);
- rollout batch B, minibatch M (one optimizer step per minibatch on ours; TRL
  steps once per B by its accumulation), 1 PPO epoch, scoring forwards of
  G rows, response length R with EOS as the stop token, temperature 1,
  β = 0.02, clip 0.2, γ = 1, λ = 0.95, one learning rate, constant;
- LoRA r=8 on the policy and value backbones (`--lora-rank 0`: full
  fine-tuning; TRL then holds a separate reference copy, as ours does);
- the same dtype (`--dtype`, resolved by services/common/dtypes: with
  `auto`, the default and what the trainers ship, bf16 autocast only where
  the CPU has native bf16; TRL gets `bf16=True` exactly then) and thread
  count. `--dtype float32` measures both sides in fp32.

Timed: the wall time from the end of the first PPO step to the end of the
last (ours: metrics.jsonl's per-step clock; TRL: a step-end callback), so
model loading, publishing and the first step's warm-up count on neither side.
Episodes/s = (steps − 1) × B / that time. Each side runs `--repeats` times
(default 2), the sides alternating; the ratio is of the medians. Single runs
of either side moved by up to 40% between runs on this 2-core machine.

TRL 0.29.1 conflicts with the project's trl 1.16, so it runs as a
subprocess in its own venv, built by bench/ppo/setup_trl.sh on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from bench.common import print_table, trainer_sandbox, write_results

HERE = Path(__file__).resolve().parent
TARGET = 1.5
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def report_rows(model_name: str, results: dict, ratio: float) -> list[dict]:
    """The row bench/report.py renders into the results tables (see its docstring)."""
    ours, trl = results["ours"], results["trl"]
    return [
        {
            "what": f"PPO episodes per second, {model_name}, trainers/ppo.py (engine rollouts)",
            "result": f"{ours['episodes_per_s']:.3f} episodes/s",
            "baseline": f"TRL {trl['trl_version']} `PPOTrainer`, same model, prompts and batches:"
            f" {trl['episodes_per_s']:.3f} episodes/s",
            "ratio": round(ratio, 2),
            "ratio_note": f" (target {TARGET}×)",
            "headline": True,
        }
    ]


def trl_python() -> str:
    out = subprocess.run([str(HERE / "setup_trl.sh")], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def build_reward_model(model_dir: Path, out: Path, seed: int) -> Path:
    from services.common.models import RewardModel, load_tokenizer

    torch.manual_seed(seed)
    RewardModel.from_causal_lm(model_dir).save_pretrained(out, tokenizer=load_tokenizer(model_dir))
    return out


def run_ours(work: Path, snapshot: str, sft: str, rm: str, spec: dict, run: int = 0) -> dict:
    from trainers import ppo

    sets = {
        "total_steps": spec["steps"],
        "rollout_batch_size": spec["rollout_batch_size"],
        "mini_batch_size": spec["mini_batch_size"],
        "generation_batch_size": spec["forward_batch_size"],
        "rollout_engine": spec["rollout_engine"],
        "ppo_epochs": spec["ppo_epochs"],
        "max_prompt_tokens": spec["max_prompt_tokens"],
        "max_new_tokens": spec["max_new_tokens"],
        "temperature": spec["temperature"],
        "kl_beta": spec["kl_beta"],
        "clip_range": spec["clip_range"],
        "value_clip_range": spec["value_clip_range"],
        "vf_coef": spec["vf_coef"],
        "gamma": spec["gamma"],
        "lam": spec["lam"],
        "lr": spec["lr"],
        "value_lr": spec["lr"],
        "max_grad_norm": spec["max_grad_norm"],
        "lora_rank": spec["lora_rank"],
        "lora_alpha": spec["lora_alpha"],
        "lora_targets": spec["lora_targets"],
        "ptx_coef": 0.0,
        "ema_decay": 0.0,
        "adaptive_kl": False,
        "missing_eos_penalty": 0.0,
        "save_every": spec["steps"],
        "dtype": spec["dtype"],
        "seed": spec["seed"],
    }
    name = f"ours-{spec['rollout_engine']}-{run}"
    argv = ["--snapshot", snapshot, "--sft", sft, "--reward", rm, "--run-dir", str(work / name)]
    argv += ["--result-file", str(work / f"{name}.json"), "--preset", "tiny"]
    argv += [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert ppo.main(argv) == 0
    rows = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
    seconds = rows[-1]["time_s"] - rows[0]["time_s"]
    timed = len(rows) - 1
    return {
        "steps": len(rows),
        "timed_steps": timed,
        "timed_seconds": seconds,
        "episodes_per_s": timed * spec["rollout_batch_size"] / seconds,
        "mean_response_length": sum(r["response_length"] for r in rows) / len(rows),
    }


def median_run(runs: list[dict]) -> dict:
    """One side's runs as one record: the fields every run shares, the median episodes/s,
    every run's episodes/s in run order, and the runs themselves (their own timings)."""
    eps = [r["episodes_per_s"] for r in runs]
    shared = {k: v for k, v in runs[0].items() if all(r.get(k) == v for r in runs)}
    return {**shared, "episodes_per_s": statistics.median(eps), "episodes_per_s_runs": eps, "runs": runs}


def run_trl(python: str, spec: dict, work: Path) -> dict:
    path = work / "trl-spec.json"
    path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_") and k != "PYTHONPATH"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run(
        [python, str(HERE / "trl_side.py"), str(path)], env=env, capture_output=True, text=True, cwd=work
    )
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-6000:])
        raise RuntimeError(f"the TRL side failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke run of a few minutes")
    parser.add_argument("--model", choices=("tiny", "base"), help="default: base (tiny with --quick)")
    parser.add_argument("--steps", type=int, help="PPO steps per side (default 6; 4 with --quick)")
    parser.add_argument("--rollout-batch", type=int, default=8, help="episodes per PPO step (B)")
    parser.add_argument("--mini-batch", type=int, default=4, help="episodes per PPO update (M)")
    parser.add_argument("--forward-batch", type=int, default=8, help="rows per scoring forward (G)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="response length (R)")
    parser.add_argument("--max-prompt-tokens", type=int, default=96)
    parser.add_argument("--lora-rank", type=int, default=8, help="0 = full fine-tuning")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, help="runs per side, alternating (default 2; 1 with --quick)")
    parser.add_argument(
        "--also-hf", action="store_true", help="also run ours with rollout_engine=hf (transformers generate)"
    )
    args = parser.parse_args()
    if args.rollout_batch % args.mini_batch:
        parser.error("--rollout-batch must be a multiple of --mini-batch")
    kind = args.model or ("tiny" if args.quick else "base")
    steps = args.steps or (4 if args.quick else 6)
    if steps < 2:
        parser.error("--steps must be at least 2 (the first step is warm-up)")
    torch.set_num_threads(args.threads)

    python = trl_python()
    repeats = args.repeats or (1 if args.quick else 2)
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    with trainer_sandbox("bench-ppo-", RLHF_TORCH_THREADS=str(args.threads)) as work:
        from bench.train.__main__ import bench_model
        from services.common.checkpoints import CheckpointStore
        from services.common.config import load_settings
        from services.common.datasets import SnapshotStore
        from services.common.dtypes import cpu_capability, resolve_dtype
        from services.common.models import REWARD_HEAD_FILE, encode_prompts, load_tokenizer
        from trainers.synthetic import records

        settings = load_settings()
        model_dir = bench_model(kind, 30, work / "model")  # base: all 30 layers of SmolLM2-135M
        rm_dir = build_reward_model(model_dir, work / "rm", seed=0)
        data = records(max(64, 4 * args.rollout_batch), seed=0, users=20)
        snapshot = SnapshotStore(settings.dataset_dir).write(data)["snapshot_id"]
        store = CheckpointStore(settings.checkpoint_dir)
        sft = store.import_dir(model_dir, "sft").version
        rm = store.import_dir(rm_dir, "rm").version
        tokenizer = load_tokenizer(model_dir)
        prompt_texts = list(dict.fromkeys(r["text"] for r in data["train"]["prompts"]))
        dtype, reason = resolve_dtype(args.dtype, "cpu")
        spec = {
            "sft_dir": str(model_dir),
            "rm_dir": str(rm_dir),
            "rm_head_file": str(rm_dir / REWARD_HEAD_FILE),
            "prompt_ids": encode_prompts(tokenizer, prompt_texts, args.max_prompt_tokens),
            "output_dir": str(work / "trl"),
            "steps": steps,
            "rollout_batch_size": args.rollout_batch,
            "mini_batch_size": args.mini_batch,
            "forward_batch_size": args.forward_batch,
            "ppo_epochs": 1,
            "max_prompt_tokens": args.max_prompt_tokens,
            "max_new_tokens": args.max_new_tokens,
            "temperature": 1.0,
            "kl_beta": 0.02,
            "clip_range": 0.2,
            "value_clip_range": 0.2,
            "vf_coef": 0.5,
            "gamma": 1.0,
            "lam": 0.95,
            "lr": args.lr,
            "max_grad_norm": 1.0,
            "lora_rank": args.lora_rank,
            "lora_alpha": 16.0,
            "lora_targets": LORA_TARGETS,
            "dtype": args.dtype,
            "bf16": dtype == torch.bfloat16,
            "threads": args.threads,
            "seed": 0,
            "rollout_engine": "engine",
        }
        runs: dict[str, list[dict]] = {"ours": [], "ours_hf": [], "trl": []}
        for run in range(repeats):  # the sides alternate, so a slow spell of the machine hits both
            runs["ours"].append(run_ours(work, snapshot, sft, rm, spec, run))
            if args.also_hf:
                runs["ours_hf"].append(run_ours(work, snapshot, sft, rm, {**spec, "rollout_engine": "hf"}, run))
            runs["trl"].append(run_trl(python, spec, work))
    results = {side: median_run(side_runs) for side, side_runs in runs.items() if side_runs}

    ratio = results["ours"]["episodes_per_s"] / results["trl"]["episodes_per_s"]
    model_name = "tiny preset" if kind == "tiny" else "SmolLM2-135M (base preset)"
    labels = {
        "ours": "ours (engine rollouts)",
        "ours_hf": "ours (HF generate rollouts)",
        "trl": f"TRL {results['trl']['trl_version']} PPOTrainer",
    }
    rows = [
        {
            "trainer": labels[k],
            "episodes/s (median)": r["episodes_per_s"],
            "runs": " ".join(f"{x:.3f}" for x in r["episodes_per_s_runs"]),
            "timed steps": " ".join(str(run["timed_steps"]) for run in r["runs"]),
        }
        for k, r in results.items()
    ]
    print_table(
        f"bench/ppo: {model_name}, B={args.rollout_batch}, M={args.mini_batch}, R={args.max_new_tokens}, "
        f"LoRA r={args.lora_rank}, {dtype} ({reason}), {args.threads} threads",
        rows,
    )
    met = ratio >= TARGET
    print(f"ours / TRL episodes per second: {ratio:.2f}x   target >= {TARGET}x: {'MET' if met else 'NOT MET'}")
    write_results(
        "ppo",
        {
            "quick": args.quick,
            "model": model_name,
            "cpu_capability": cpu_capability(),
            "dtype": str(dtype).removeprefix("torch."),
            "dtype_reason": reason,
            "threads": args.threads,
            "rollout_batch": args.rollout_batch,
            "mini_batch": args.mini_batch,
            "forward_batch": args.forward_batch,
            "max_new_tokens": args.max_new_tokens,
            "lora_rank": args.lora_rank,
            "steps": steps,
            "repeats": repeats,
            **results,
            "ratio": ratio,
            "target": TARGET,
            "target_met": met,
            "rows": report_rows(model_name, results, ratio),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
