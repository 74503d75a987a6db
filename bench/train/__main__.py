"""`python -m bench.train [--quick]`: our K-way reward-model trainer vs TRL's
pairwise RewardTrainer on the same rankings, same model, same run.

Data: synthetic K = 8 rankings with a learnable preference (more "good"
words rank higher; trainers/synthetic.py), no ties, split by user.
- Ours (`python -m trainers.rm`, run in this process): a batch element is a
  prompt; its 8 responses are forwarded once and all 28 pairs share them.
- TRL 1.16 `RewardTrainer`: the equivalent pairwise dataset, 28 (chosen,
  rejected) rows per prompt, each row forwarding both sequences.
Both get the same token ids, the same initial weights (a fresh scalar head
on the same backbone), 1 epoch over the same comparisons, the same number of
optimizer steps (B prompts = 28·B pairs per step, in micro-batches of 4
prompts = 112 pairs, gradients accumulated), AdamW at a constant
learning rate, fp32, no gradient checkpointing. Timed: the training loop
only (ours: the trainer's own `train_seconds`; TRL: `trainer.train()`).
Accuracy: every held-out pair (validation users), scored by each model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.common import MODEL_CACHE, print_table, trainer_sandbox, write_results
from services.common.models import ensure_preset

PAIRS_PER_PROMPT = 28  # C(8, 2)


def bench_model(kind: str, layers: int, out: Path) -> Path:
    """`tiny`: the test preset. `base`: SmolLM2-135M cut to its first `layers`
    layers, so the benchmark fits a CPU while keeping pretrained embeddings."""
    if kind == "tiny":
        return ensure_preset("tiny", MODEL_CACHE)
    from services.common.models import load_causal_lm, load_tokenizer

    base = ensure_preset("base", MODEL_CACHE)
    model = load_causal_lm(base)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(base).save_pretrained(out)
    return out


def run_ours(
    work: Path, snapshot: str, sft: str, batch_prompts: int, micro_prompts: int, lr: float, max_tokens: int
) -> dict:
    import json

    from trainers import rm

    sets = {
        "epochs": 1,
        "max_steps": 0,
        "batch_size": batch_prompts,
        "micro_batch_size": micro_prompts,
        "lr": lr,
        "min_lr_ratio": 1.0,
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "max_tokens": max_tokens,
        "lora_rank": 0,
        "dtype": "float32",
        "max_val_prompts": 100000,
        "save_every": 100000,
        "eval_every": 0,
        "seed": 0,
    }
    argv = [
        "--snapshot",
        snapshot,
        "--sft",
        sft,
        "--run-dir",
        str(work / "ours"),
        "--result-file",
        str(work / "ours.json"),
        "--preset",
        "tiny",
        *[a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")],
    ]
    assert rm.main(argv) == 0
    return json.loads((work / "ours.json").read_text())["metrics"]


def run_trl(work: Path, model_dir: Path, train, val, batch_prompts: int, micro_prompts: int, lr: float) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from services.common.models import load_tokenizer, pad_batch
    from trainers.rm import ranking_pairs

    rows = []
    for seqs, ranks in train:
        winners, losers, _, _ = ranking_pairs([ranks])
        rows += [
            {"chosen_ids": seqs[w], "rejected_ids": seqs[lo]}
            for w, lo in zip(winners.tolist(), losers.tolist(), strict=True)
        ]
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    config = RewardConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=micro_prompts * PAIRS_PER_PROMPT,
        gradient_accumulation_steps=batch_prompts // micro_prompts,
        num_train_epochs=1,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        report_to=[],
        logging_strategy="no",
        disable_tqdm=True,
        max_length=None,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    trainer = RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for seqs, ranks in val:
            ids, mask = pad_batch(seqs, tokenizer.pad_token_id, side="right")
            scores = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
            winners, losers, _, _ = ranking_pairs([ranks])
            correct += int((scores[winners] > scores[losers]).sum())
            total += len(winners)
    return {
        "train_seconds": seconds,
        "val_pair_accuracy": correct / max(1, total),
        "train_pairs": len(rows),
        "val_pairs": total,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny model, few prompts: a smoke run in well under a minute"
    )
    parser.add_argument("--model", choices=("tiny", "base"), help="default: base (tiny with --quick)")
    parser.add_argument("--layers", type=int, default=4, help="layers of the base model kept (default 4)")
    parser.add_argument(
        "--prompts", type=int, help="prompts in all (default 160, 40 with --quick); 20%% are held-out users"
    )
    parser.add_argument(
        "--batch-prompts", type=int, default=8, help="prompts per step (ours) = 28x that many pairs per step (TRL)"
    )
    parser.add_argument(
        "--micro-prompts", type=int, default=4, help="prompts per forward (TRL: 28x that many pairs, accumulated)"
    )
    parser.add_argument("--lr", type=float, help="default 1e-3 (tiny) / 1e-4 (base)")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    if args.batch_prompts % args.micro_prompts:
        parser.error("--batch-prompts must be a multiple of --micro-prompts")
    kind = args.model or ("tiny" if args.quick else "base")
    n_prompts = args.prompts or (40 if args.quick else 160)
    lr = args.lr or (1e-3 if kind == "tiny" else 1e-4)

    with trainer_sandbox("bench-train-") as work:
        from services.common.checkpoints import CheckpointStore
        from services.common.config import load_settings
        from services.common.datasets import SnapshotStore
        from services.common.models import load_tokenizer
        from trainers.rm import encode_comparison
        from trainers.synthetic import records

        settings = load_settings()
        model_dir = bench_model(kind, args.layers, work / "model")
        data = records(n_prompts, k_min=8, k_max=8, ties=False, seed=0, users=20)
        snapshot = SnapshotStore(settings.dataset_dir).write(data)["snapshot_id"]
        sft = CheckpointStore(settings.checkpoint_dir).import_dir(model_dir, "sft").version
        tokenizer = load_tokenizer(model_dir)
        train = [encode_comparison(tokenizer, r, args.max_tokens) for r in data["train"]["comparisons"]]
        val = [encode_comparison(tokenizer, r, args.max_tokens) for r in data["validation"]["comparisons"]]

        ours = run_ours(work, snapshot, sft, args.batch_prompts, args.micro_prompts, lr, args.max_tokens)
        trl_result = run_trl(work, model_dir, train, val, args.batch_prompts, args.micro_prompts, lr)

    import trl

    speedup = trl_result["train_seconds"] / ours["train_seconds"]
    gap = 100 * (ours["val_pair_accuracy"] - trl_result["val_pair_accuracy"])
    model_name = "tiny preset" if kind == "tiny" else f"SmolLM2-135M, first {args.layers} layers"
    rows = [
        {
            "trainer": "ours: K-way (1 elem/prompt)",
            "train_s": ours["train_seconds"],
            "forwards/prompt": 8,
            "held-out pair acc": ours["val_pair_accuracy"],
            "val pairs": ours["val_pairs"],
        },
        {
            "trainer": f"TRL {trl.__version__} RewardTrainer (pairwise)",
            "train_s": trl_result["train_seconds"],
            "forwards/prompt": 56,
            "held-out pair acc": trl_result["val_pair_accuracy"],
            "val pairs": trl_result["val_pairs"],
        },
    ]
    print_table(
        f"bench/train: {model_name}, {len(train)} train prompts x 28 pairs, 1 epoch, {args.batch_prompts} prompts/step",
        rows,
    )
    verdict = speedup >= 4 and gap >= -2
    print(
        f"speedup (TRL time / ours): {speedup:.2f}x   accuracy difference (ours - TRL): {gap:+.1f} points   "
        f"target >= 4x and >= -2 points: {'MET' if verdict else 'NOT MET'}",
        flush=True,
    )
    write_results(
        "train",
        {
            "quick": args.quick,
            "model": model_name,
            "train_prompts": len(train),
            "pairs_per_prompt": PAIRS_PER_PROMPT,
            "batch_prompts": args.batch_prompts,
            "micro_prompts": args.micro_prompts,
            "lr": lr,
            "trl_version": trl.__version__,
            "ours": {k: ours[k] for k in ("train_seconds", "val_pair_accuracy", "val_prompt_accuracy", "val_pairs")},
            "trl": trl_result,
            "speedup": speedup,
            "accuracy_gap_points": gap,
            "target_met": verdict,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
