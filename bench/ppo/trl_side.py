"""The TRL side of bench/ppo: TRL 0.29.1's PPOTrainer (trl.experimental.ppo)
on the spec that bench/ppo/__main__.py wrote, in TRL's own venv
(bench/ppo/setup_trl.sh). It imports nothing from this project.

    .cache/bench-trl-venv/bin/python bench/ppo/trl_side.py SPEC.json

Models, as our trainer builds them: the policy from the SFT folder; the
reward model and the value model from the RM folder (its backbone plus our
scalar head, copied into LlamaForSequenceClassification's `score`); with
LoRA, the policy gets TRL's own peft path (the reference is the policy with
its adapter disabled) and the value backbone gets the same adapters
injected, head trainable, as ours. Timing: wall time between the ends of the
first and the last PPO step (a TrainerCallback), so model loading and the
first step's one-off costs count on neither side. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time

import torch


def main(spec_path: str) -> int:
    from datasets import Dataset
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import __version__ as trl_version
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    spec = json.loads(open(spec_path).read())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["sft_dir"])
    tokenizer.padding_side = "left"

    def scalar_model():
        model = AutoModelForSequenceClassification.from_pretrained(spec["rm_dir"], num_labels=1, dtype=torch.float32)
        head = load_file(spec["rm_head_file"])
        with torch.no_grad():
            model.score.weight.copy_(head["weight"])
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    policy = AutoModelForCausalLM.from_pretrained(spec["sft_dir"], dtype=torch.float32)
    reward_model = scalar_model()
    value_model = scalar_model()
    targets = [t for t in spec["lora_targets"].split(",") if t]
    peft_config = None
    ref_model = None
    if spec["lora_rank"] > 0:
        peft_config = LoraConfig(
            r=spec["lora_rank"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0, target_modules=targets, bias="none"
        )
        inject_adapter_in_model(peft_config, value_model.model)
        for name, param in value_model.named_parameters():
            param.requires_grad = "lora_" in name or name.startswith("score")
    else:
        ref_model = AutoModelForCausalLM.from_pretrained(spec["sft_dir"], dtype=torch.float32)

    prompts = Dataset.from_dict({"input_ids": spec["prompt_ids"]})
    batch, mini = spec["rollout_batch_size"], spec["mini_batch_size"]
    config = PPOConfig(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=mini,
        gradient_accumulation_steps=batch // mini,
        num_mini_batches=batch // mini,
        local_rollout_forward_batch_size=spec["forward_batch_size"],
        num_ppo_epochs=spec["ppo_epochs"],
        total_episodes=spec["steps"] * batch,
        response_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
        stop_token="eos",
        kl_coef=spec["kl_beta"],
        cliprange=spec["clip_range"],
        cliprange_value=spec["value_clip_range"],
        vf_coef=spec["vf_coef"],
        gamma=spec["gamma"],
        lam=spec["lam"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=spec["max_grad_norm"],
        bf16=spec["bf16"],
        use_cpu=True,
        num_sample_generations=0,
        save_strategy="no",
        report_to=[],
        logging_steps=10**6,
        disable_tqdm=True,
        seed=spec["seed"],
    )

    step_ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_model,
        reward_model=reward_model,
        train_dataset=prompts,
        value_model=value_model,
        eval_dataset=prompts.select(range(min(len(prompts), mini))),
        callbacks=[Clock()],
        peft_config=peft_config,
    )
    started = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - started
    timed_steps = len(step_ends) - 1
    seconds = step_ends[-1] - step_ends[0] if timed_steps > 0 else total
    print(
        json.dumps(
            {
                "trl_version": trl_version,
                "steps": len(step_ends),
                "timed_steps": timed_steps,
                "timed_seconds": seconds,
                "episodes_per_s": timed_steps * batch / seconds if timed_steps > 0 else len(step_ends) * batch / total,
                "train_seconds": total,
                "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
