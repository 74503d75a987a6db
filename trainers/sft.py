"""Supervised fine-tuning (InstructGPT step 1) on labeler demonstrations.

    python -m trainers.sft --snapshot ID [--init VERSION] --run-dir DIR --result-file F.json
                           [--preset tiny|cpu|gpu] [--config cfg.json] [--set key=value ...]

Each demonstration becomes chat-template(prompt) + response + EOS; the loss
is the mean cross-entropy over response tokens only (prompt tokens are
context, not targets). Validation loss on the snapshot's validation split
picks the best checkpoint, which is what gets published (kind `sft`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from services.common.models import (
    encode_prompt_response,
    load_causal_lm,
    load_tokenizer,
    pad_batch,
    position_ids_from_mask,
    render_prompt,
)
from trainers.config import JobError, SupervisedConfig
from trainers.job import Job, epoch_order, global_batch, lr_at, peak_rss_gb, run_main, step_seed
from trainers.nn import (
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

IGNORE = -100


@dataclass
class SFTConfig(SupervisedConfig):
    """Supervised fine-tuning on demonstrations.

    Shared (trainers/config.py): the model (lora_*, bf16), the optimiser and
    schedule (lr, min_lr_ratio, warmup_steps, weight_decay, max_grad_norm), the
    batches (epochs, max_steps, batch_size = demonstrations per step, global;
    micro_batch_size), max_tokens (prompt + response; the prompt is cut from
    the left), eval_every (steps; 0 = once per epoch), save_every, seed.
    SFT:      max_val_examples (validation demonstrations scored per evaluation).
    """

    epochs: int = 2
    micro_batch_size: int = 8
    max_val_examples: int = 64


PRESETS = {
    # Seconds on the tiny random model, for tests; LoRA so the tests cover the adapter and merge path.
    "tiny": dict(
        epochs=2,
        batch_size=4,
        micro_batch_size=2,
        lr=1e-3,
        max_tokens=64,
        lora_rank=4,
        eval_every=4,
        save_every=2,
        max_val_examples=8,
        dtype="float32",  # tests give the same numbers on every CPU
    ),
    # The 135M base on 2 CPU cores in a few minutes: LoRA, bf16 where native, short sequences, few steps.
    "cpu": dict(
        epochs=1,
        max_steps=24,
        batch_size=8,
        micro_batch_size=4,
        lr=2e-4,
        warmup_steps=2,
        max_tokens=160,
        lora_rank=8,
        lora_alpha=16.0,
        eval_every=8,
        save_every=4,
        max_val_examples=16,
    ),
    # One GPU, the paper's recipe scaled: full fine-tuning, cosine decay (the paper: 16 epochs, dropout 0.2).
    "gpu": dict(
        epochs=4,
        batch_size=32,
        micro_batch_size=8,
        lr=1e-5,
        warmup_steps=10,
        max_tokens=1024,
        eval_every=50,
        save_every=50,
        max_val_examples=256,
    ),
}


def encode_example(tokenizer, prompt: str, response: str, max_tokens: int) -> tuple[list[int], int]:
    """Token ids of template(prompt) + response + EOS, and how many of them are prompt."""
    ids = encode_prompt_response(tokenizer, render_prompt(tokenizer, prompt), response, max_tokens)
    n_response = min(len(ids), len(tokenizer(response, add_special_tokens=False).input_ids) + 1)
    return ids, len(ids) - n_response


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, mask, and labels that are IGNORE on prompt and padding."""
    ids, mask = pad_batch([e[0] for e in examples], pad_id, side="right")
    labels = ids.clone()
    labels[mask == 0] = IGNORE
    for row, (_, n_prompt) in enumerate(examples):
        labels[row, :n_prompt] = IGNORE
    return ids, mask, labels


def lm_loss_sum(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled tokens, and their count."""
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
    ).logits
    targets = labels[:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((targets != IGNORE).sum())


@torch.no_grad()
def evaluate_loss(model, examples, pad_id: int, micro: int, device: str, bf16: bool) -> float:
    total, count = 0.0, 0
    for i in range(0, len(examples), micro):
        ids, mask, labels = (t.to(device) for t in collate(examples[i : i + micro], pad_id))
        with autocast(device, bf16):
            loss, n = lm_loss_sum(model, ids, mask, labels)
        total, count = total + float(loss), count + n
    return total / max(1, count)


def add_args(parser) -> None:
    parser.add_argument("--snapshot", required=True, help="dataset snapshot id")
    parser.add_argument("--init", help="policy checkpoint to start from (default: the model preset)")


def main(argv: list[str] | None = None) -> int:
    job = Job.start("sft", SFTConfig, PRESETS, argv, add_args)
    cfg, args, device = job.cfg, job.args, job.device
    version = job.planned_version("sft")

    # --- inputs -------------------------------------------------------------
    if args.init:
        init_path, parents = job.checkpoint(args.init, ("base", "sft", "ppo"), "--init"), [args.init]
    else:
        init_path, parents = job.base_model()
    tokenizer = load_tokenizer(init_path)
    train = [
        encode_example(tokenizer, d["prompt_text"], d["response"], cfg.max_tokens)
        for d in job.read(args.snapshot, "train", "demonstrations")
    ]
    if not train:
        raise JobError(f"snapshot {args.snapshot} has no train demonstrations; SFT needs at least 1")
    val = [
        encode_example(tokenizer, d["prompt_text"], d["response"], cfg.max_tokens)
        for d in job.read(args.snapshot, "validation", "demonstrations")
    ][: cfg.max_val_examples]
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch if cfg.max_steps <= 0 else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    eval_every = cfg.eval_every or steps_per_epoch

    # --- model ----------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    model = load_causal_lm(init_path, device=device).train()
    if cfg.lora_rank > 0:
        model = add_lora(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model = job.wrap_ddp(model)

    start, best_val = 0, math.inf
    state = job.load_state()
    if state:
        load_trainable_state(model, state["weights"])
        optimizer.load_state_dict(state["optimizer"])
        start, best_val = state["step"], state["best_val"]
    best_path = job.run_dir / "state" / "best.pt"

    # --- the loop ---------------------------------------------------------------
    progress = tqdm(total=total, initial=start, desc="sft", disable=not job.is_main, dynamic_ncols=True)
    metrics: dict = {}
    for step in range(start, total):
        step_seed(cfg.seed, job.rank, step)
        lr = lr_at(step, total, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = [
            train[i]
            for i in job.rank_slice(
                global_batch(
                    lambda e: epoch_order(len(train), cfg.seed, e), len(train), cfg.batch_size, step, job.world
                )
            )
        ]
        n_tokens = sum(len(ids) - n_prompt for ids, n_prompt in batch)
        # DDP averages gradients over ranks; dividing by the mean token count per rank makes that the step's token mean
        n_tokens_mean = float(all_reduce_(torch.tensor(float(n_tokens), device=device))) / job.world
        optimizer.zero_grad(set_to_none=True)
        loss_total = 0.0
        for i in range(0, len(batch), cfg.micro_batch_size):
            ids, mask, labels = (
                t.to(device) for t in collate(batch[i : i + cfg.micro_batch_size], tokenizer.pad_token_id)
            )
            with autocast(device, job.bf16):
                loss_sum, _ = lm_loss_sum(model, ids, mask, labels)
            (loss_sum / n_tokens_mean).backward()  # mean over the step's response tokens
            loss_total += loss_sum.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        loss_total, n_tokens = sum_over_ranks(
            [loss_total, float(n_tokens)], device
        )  # the whole step, not rank 0's share
        metrics = {
            "train_loss": loss_total / n_tokens,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": int(n_tokens),
        }

        done = step + 1
        if job.is_main and val and (done % eval_every == 0 or done == total):  # other ranks wait at the next all-reduce
            metrics["val_loss"] = evaluate_loss(
                unwrap(model).eval(), val, tokenizer.pad_token_id, cfg.micro_batch_size, device, job.bf16
            )
            unwrap(model).train()
            if metrics["val_loss"] < best_val:
                best_val = metrics["val_loss"]
                torch.save(trainable_state(model), best_path)
        job.log(step, metrics, progress)
        progress.update(1)
        if done % cfg.save_every == 0 or done == total:
            job.save_state(done, weights=trainable_state(model), optimizer=optimizer.state_dict(), best_val=best_val)
    progress.close()

    # --- publish the best weights ------------------------------------------------
    model = unwrap(model)
    if best_path.exists() and job.is_main:
        load_trainable_state(model, torch.load(best_path, map_location=device))
    summary = {
        "train_loss": metrics.get("train_loss", _last(job, "train_loss")),
        "best_val_loss": best_val if val else None,
        "steps": total,
        "train_examples": len(train),
        "val_examples": len(val),
        "peak_rss_gb": round(peak_rss_gb(), 2),
    }
    merged = merge_lora(model)

    def write(folder):
        merged.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    announced = job.publish("sft", version, write, parents=parents, snapshot=args.snapshot, metrics=summary)
    job.finish(
        {"version": version, "kind": "sft", "metrics": summary, "announced": announced},
        curves=["train_loss", "val_loss", "lr", "grad_norm"],
        report=markdown_report(
            f"SFT run {version}", summary, cfg, notes=f"Snapshot `{args.snapshot}`, init `{parents}`."
        ),
    )
    return 0


def _last(job: Job, key: str):
    values = [r[key] for r in job.metrics_history() if key in r]
    return values[-1] if values else None


if __name__ == "__main__":
    run_main(main)
