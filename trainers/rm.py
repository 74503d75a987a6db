"""Reward model (InstructGPT step 2): K-way rankings, all C(K,2) pairs of a
prompt in one batch element.

    python -m trainers.rm --snapshot ID --sft VERSION --run-dir DIR --result-file F.json
                          [--preset tiny|cpu|gpu] [--config cfg.json] [--set key=value ...]

The model is the SFT model without its unembedding plus a scalar head
(RewardModel.from_causal_lm). A batch is a set of prompts; each prompt's K
responses are forwarded once, and every non-tie pair (w, l) of that prompt
contributes log σ(r_w − r_l) to the prompt's loss. Prompts with different K
share a batch: the responses are flattened into one padded tensor and the
pairs index into it. After training, a bias is added so that the train
demonstrations score a mean of 0. Validation (users unseen in training)
reports accuracy per pair and per prompt.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from itertools import combinations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from services.common.datasets import count_by_policy_version
from services.common.models import (
    RewardModel,
    encode_prompt_response,
    last_token_index,
    load_tokenizer,
    pad_batch,
    render_prompt,
)
from trainers.config import JobError, SupervisedConfig
from trainers.job import Job, epoch_order, global_batch, lr_at, peak_rss_gb, run_main, step_seed
from trainers.nn import add_lora, autocast, load_trainable_state, merge_lora, sum_over_ranks, trainable_state, unwrap
from trainers.report import markdown_report


@dataclass
class RMConfig(SupervisedConfig):
    """Reward-model training on K-way rankings.

    Shared (trainers/config.py): the model (lora_*, bf16; the scalar head
    always trains), the optimiser and schedule (lr, min_lr_ratio, warmup_steps,
    weight_decay, max_grad_norm), the batches (epochs, max_steps, batch_size =
    prompts per step, global; micro_batch_size = prompts per forward, per
    rank), max_tokens per response sequence (prompt cut from the left),
    eval_every (steps; 0 = at the end only), save_every, seed.
    RM:       epochs 1 (the paper finds more epochs overfit), lr 9e-6 (the
              paper's); max_val_prompts, max_bias_examples (demonstrations
              scored for the mean-0 bias).
    """

    epochs: int = 1
    micro_batch_size: int = 4
    lr: float = 9e-6
    max_val_prompts: int = 256
    max_bias_examples: int = 256


PRESETS = {
    "tiny": dict(
        batch_size=4,
        micro_batch_size=2,
        lr=1e-3,
        max_tokens=64,
        save_every=2,
        max_val_prompts=16,
        max_bias_examples=16,
        dtype="float32",  # tests give the same numbers on every CPU
    ),
    # 135M base on 2 cores in a few minutes: LoRA, bf16 where native, short sequences, capped steps.
    "cpu": dict(
        max_steps=30,
        batch_size=4,
        micro_batch_size=2,
        lr=1e-4,
        warmup_steps=2,
        max_tokens=128,
        lora_rank=8,
        save_every=5,
        max_val_prompts=32,
        max_bias_examples=32,
    ),
    # The paper: 64 prompts per batch (up to 2,304 comparisons), lr 9e-6, 1 epoch.
    "gpu": dict(
        batch_size=64,
        micro_batch_size=8,
        lr=9e-6,
        warmup_steps=5,
        max_tokens=512,
        save_every=20,
        max_val_prompts=1024,
        max_bias_examples=1024,
    ),
}


# --- the K-way loss ---------------------------------------------------------------


def ranking_pairs(ranks_per_prompt: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """All non-tie pairs of each prompt, as indices into the flattened responses.

    Returns (winners, losers, weights, n_prompts): pair p says response
    winners[p] ranked above losers[p] (rank 1 = best); weights[p] is 1 / (the
    number of non-tie pairs of its prompt); n_prompts counts the prompts with
    at least one such pair. Responses of prompt i follow those of prompt i-1.
    """
    winners, losers, weights = [], [], []
    offset, n_prompts = 0, 0
    for ranks in ranks_per_prompt:
        pairs = [
            (offset + i, offset + j) if ranks[i] < ranks[j] else (offset + j, offset + i)
            for i, j in combinations(range(len(ranks)), 2)
            if ranks[i] != ranks[j]
        ]
        if pairs:
            n_prompts += 1
            winners += [w for w, _ in pairs]
            losers += [loser for _, loser in pairs]
            weights += [1.0 / len(pairs)] * len(pairs)
        offset += len(ranks)
    return (
        torch.tensor(winners, dtype=torch.long),
        torch.tensor(losers, dtype=torch.long),
        torch.tensor(weights),
        n_prompts,
    )


def kway_loss(
    scores: torch.Tensor, winners: torch.Tensor, losers: torch.Tensor, weights: torch.Tensor, n_prompts: float
) -> torch.Tensor:
    """InstructGPT's ranking loss, averaged over prompts:

        loss = −1/P · Σ_prompts 1/N_p · Σ_{(w,l) in prompt} log σ(r_w − r_l)

    N_p is the number of NON-TIE pairs of the prompt, not C(K,2). Without ties
    the two are equal and this is exactly the paper's 1/C(K,2). With ties the
    paper's rule is "ties are dropped"; dividing by C(K,2) would then make a
    prompt with many ties count less, and a prompt whose K responses are mostly
    tied would barely train at all. Dividing by N_p keeps what the 1/C(K,2)
    factor is for: every prompt is one batch element with weight 1, however
    many comparisons it yields, so the correlated pairs of one prompt cannot
    dominate a batch (the paper's reason for the K-way batching).

    `n_prompts` is the normaliser P; pass the whole step's prompt count when
    the step is split into micro-batches.
    """
    margins = scores[winners] - scores[losers]
    return -(weights.to(scores.device) * F.logsigmoid(margins.float())).sum() / (n_prompts if n_prompts > 0 else 1)


# --- data ---------------------------------------------------------------------------


def encode_comparison(tokenizer, record: dict, max_tokens: int) -> tuple[list[list[int]], list[int]]:
    prompt = render_prompt(tokenizer, record["prompt_text"])
    seqs = [encode_prompt_response(tokenizer, prompt, r["text"], max_tokens) for r in record["responses"]]
    return seqs, [int(r["rank"]) for r in record["responses"]]


def usable(record: dict) -> bool:
    """At least two responses and at least one non-tie pair."""
    return len(record["responses"]) >= 2 and len({r["rank"] for r in record["responses"]}) >= 2


def forward_prompts(model, prompts: list[tuple[list[list[int]], list[int]]], pad_id: int, device: str, bf16: bool):
    """Score every response of these prompts in one padded forward; each response once."""
    flat = [seq for seqs, _ in prompts for seq in seqs]
    ids, mask = pad_batch(flat, pad_id, side="right")
    ids, mask = ids.to(device), mask.to(device)
    with autocast(device, bf16):
        values = model(ids, mask)  # forward() rather than score(), so DDP's gradient hooks run
    scores = values.float().gather(1, last_token_index(mask)[:, None]).squeeze(1) + unwrap(model).output_bias
    return scores, ranking_pairs([ranks for _, ranks in prompts])


@torch.no_grad()
def validate(model, prompts, pad_id: int, micro: int, device: str, bf16: bool) -> dict:
    """Pair accuracy (all non-tie pairs), prompt accuracy (mean of each prompt's
    pair accuracy), top-1 accuracy (a best-ranked response scores highest) and loss."""
    correct = total = 0
    prompt_acc, top1, losses = [], [], []
    for i in range(0, len(prompts), micro):
        chunk = prompts[i : i + micro]
        scores, (w, lo, weights, n) = forward_prompts(model, chunk, pad_id, device, bf16)
        losses.append(float(kway_loss(scores, w, lo, weights, n)) * n)
        right = (scores[w] > scores[lo]).float()
        correct, total = correct + float(right.sum()), total + len(w)
        offset = 0
        for seqs, ranks in chunk:
            k = len(seqs)
            inside = (w >= offset) & (w < offset + k)
            prompt_acc.append(float(right[inside].mean()))
            best = int(scores[offset : offset + k].argmax())
            top1.append(float(ranks[best] == min(ranks)))
            offset += k
    n = max(1, len(prompt_acc))
    return {
        "val_pair_accuracy": correct / max(1, total),
        "val_prompt_accuracy": sum(prompt_acc) / n,
        "val_top1_accuracy": sum(top1) / n,
        "val_loss": sum(losses) / n,
        "val_pairs": total,
        "val_prompts": len(prompt_acc),
    }


@torch.no_grad()
def mean_raw_score(model, seqs: list[list[int]], pad_id: int, micro: int, device: str, bf16: bool) -> float:
    total = 0.0
    for i in range(0, len(seqs), micro):
        ids, mask = pad_batch(seqs[i : i + micro], pad_id, side="right")
        with autocast(device, bf16):
            total += float((model.score(ids.to(device), mask.to(device)) - model.output_bias).float().sum())
    return total / max(1, len(seqs))


def add_args(parser) -> None:
    parser.add_argument("--snapshot", required=True, help="dataset snapshot id")
    parser.add_argument("--sft", required=True, help="SFT checkpoint the reward model starts from")


def main(argv: list[str] | None = None) -> int:
    job = Job.start("rm", RMConfig, PRESETS, argv, add_args)
    cfg, args, device = job.cfg, job.args, job.device
    version = job.planned_version("rm")

    # --- inputs -------------------------------------------------------------
    sft_path = job.checkpoint(args.sft, ("base", "sft", "ppo"), "--sft")
    tokenizer = load_tokenizer(sft_path)
    pad_id = tokenizer.pad_token_id
    train_records = job.read(args.snapshot, "train", "comparisons")
    train = [encode_comparison(tokenizer, r, cfg.max_tokens) for r in train_records if usable(r)]
    if not train:
        raise JobError(
            f"snapshot {args.snapshot} has no train comparisons with a non-tie pair; the RM needs at least 1"
        )
    train_users = {r["user_id"] for r in train_records}
    val_records = [r for r in job.read(args.snapshot, "validation", "comparisons") if usable(r)]
    held_out = [r for r in val_records if r["user_id"] not in train_users]  # the builder splits by user; make sure
    val = [encode_comparison(tokenizer, r, cfg.max_tokens) for r in held_out][: cfg.max_val_prompts]
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch if cfg.max_steps <= 0 else min(cfg.max_steps, cfg.epochs * steps_per_epoch)

    # --- model ----------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    model = RewardModel.from_causal_lm(sft_path, device=device).train()
    if cfg.lora_rank > 0:
        model.backbone = add_lora(model.backbone, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model = job.wrap_ddp(model)

    start, train_seconds = 0, 0.0
    state = job.load_state()
    if state:
        load_trainable_state(model, state["weights"])
        optimizer.load_state_dict(state["optimizer"])
        start, train_seconds = state["step"], state["train_seconds"]

    # --- the loop ---------------------------------------------------------------
    progress = tqdm(total=total, initial=start, desc="rm", disable=not job.is_main, dynamic_ncols=True)
    for step in range(start, total):
        tick = time.perf_counter()
        step_seed(cfg.seed, job.rank, step)
        lr = lr_at(step, total, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_batch = global_batch(
            lambda e: epoch_order(len(train), cfg.seed, e), len(train), cfg.batch_size, step, job.world
        )
        batch = [train[i] for i in job.rank_slice(step_batch)]
        # Every train prompt has a non-tie pair (see usable). DDP averages gradients over ranks, so normalising by the
        # mean prompt count per rank makes the result the mean over all of the step's prompts, however they split.
        n_prompts = len(step_batch) / job.world
        optimizer.zero_grad(set_to_none=True)
        loss_total, correct, pairs = 0.0, 0.0, 0
        for i in range(0, len(batch), cfg.micro_batch_size):
            scores, (w, lo, weights, _) = forward_prompts(
                model, batch[i : i + cfg.micro_batch_size], pad_id, device, job.bf16
            )
            loss = kway_loss(scores, w, lo, weights, n_prompts)
            loss.backward()
            loss_total += loss.item()
            correct, pairs = correct + (scores[w] > scores[lo]).sum().item(), pairs + len(w)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        train_seconds += time.perf_counter() - tick
        # Over the whole step, not rank 0's share: each rank's loss is its prompts' sum over the mean prompt count.
        loss_total, correct, pairs, responses = sum_over_ranks(
            [loss_total, correct, pairs, sum(len(s) for s, _ in batch)], device
        )
        metrics = {
            "train_loss": loss_total / job.world,
            "train_pair_accuracy": correct / max(1, pairs),
            "pairs": int(pairs),
            "responses": int(responses),
            "lr": lr,
            "grad_norm": float(grad_norm),
        }
        done = step + 1
        if job.is_main and val and cfg.eval_every and done % cfg.eval_every == 0 and done < total:
            metrics.update(validate(unwrap(model).eval(), val, pad_id, cfg.micro_batch_size, device, job.bf16))
            unwrap(model).train()
        job.log(step, metrics, progress)
        progress.update(1)
        if done % cfg.save_every == 0 or done == total:
            job.save_state(
                done, weights=trainable_state(model), optimizer=optimizer.state_dict(), train_seconds=train_seconds
            )
    progress.close()

    # --- bias, validation, publish (rank 0) ----------------------------------------------
    model = unwrap(model).eval()
    model.backbone = merge_lora(model.backbone)
    summary: dict = {
        "steps": total,
        "train_prompts": len(train),
        "train_pairs": int(sum(len(ranking_pairs([r])[0]) for _, r in train)),
        "train_seconds": round(train_seconds, 3),
        "val_users_overlapping_train": len(val_records) - len(held_out),
        # lineage: which policy versions produced the comparisons this RM learned from
        "comparisons_by_policy_version": count_by_policy_version(train_records),
    }
    if job.is_main:
        demos = job.read(args.snapshot, "train", "demonstrations")[: cfg.max_bias_examples]
        if demos:
            bias_seqs = [
                encode_prompt_response(
                    tokenizer, render_prompt(tokenizer, d["prompt_text"]), d["response"], cfg.max_tokens
                )
                for d in demos
            ]
            summary["bias_source"] = "train demonstrations"
        else:  # no demonstrations: centre the best-ranked responses instead
            bias_seqs = [seqs[ranks.index(min(ranks))] for seqs, ranks in train[: cfg.max_bias_examples]]
            summary["bias_source"] = "best-ranked train responses"
        # fp32 even under bf16 training: serving scores in fp32, and the mean must be 0 there
        model.output_bias.fill_(-mean_raw_score(model, bias_seqs, pad_id, cfg.micro_batch_size * 4, device, bf16=False))
        summary["output_bias"] = float(model.output_bias)
        if val:
            summary.update(validate(model, val, pad_id, cfg.micro_batch_size, device, job.bf16))
        summary["peak_rss_gb"] = round(peak_rss_gb(), 2)
        if val:  # put the final validation on the curves
            job.log(total, {k: v for k, v in summary.items() if k.startswith("val_")})

    announced = job.publish(
        "rm",
        version,
        lambda folder: model.save_pretrained(folder, tokenizer=tokenizer),
        parents=[args.sft],
        snapshot=args.snapshot,
        metrics=summary,
    )
    job.finish(
        {"version": version, "kind": "rm", "metrics": summary, "announced": announced},
        curves=["train_loss", "train_pair_accuracy", "val_pair_accuracy", "val_prompt_accuracy", "lr", "grad_norm"],
        report=markdown_report(
            f"Reward model run {version}",
            summary,
            cfg,
            notes=f"Snapshot `{args.snapshot}`, from SFT `{args.sft}`. K-way batching: each prompt's "
            "responses forwarded once; loss averaged over each prompt's non-tie pairs.",
        ),
    )
    return 0


if __name__ == "__main__":
    run_main(main)
