"""The gate job: the measurements both promotion gates decide on, in one process.

    python -m services.controller.gate_eval --candidate PPO --incumbent SERVING --reference SFT
        --reward NEW_RM [--incumbent-reward SERVING_RM] --snapshot ID --result-file F.json
        [--run-dir DIR] [--preset tiny|cpu|gpu] [--set key=value ...]

On the snapshot's validation split (users the trainers never saw):
  - the reward-model gate: pairwise accuracy of the new RM and of the serving
    RM on the same held-out comparisons (ties dropped);
  - the policy gate: one sample per prompt from the candidate and from the
    serving policy (prompt i seeded with seed + i for both, so the two see the
    same random numbers), drawn by the serving engine (services/policy/offline.py),
    each scored by the new RM and by the serving RM (a policy's samples are kept
    under $RLHF_HOME/cache/gate-samples, so the policy a round promotes is not
    decoded again as the next round's incumbent);
    and the candidate's KL to the reference, log pi - log pi_ref summed over
    its response tokens (sampled at temperature 1, so the estimate is unbiased).

It decides nothing; the controller applies services/controller/gate.py to the
result JSON. It runs as a trainer job (local subprocess or Kubernetes Job).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from services.common.checkpoints import CheckpointStore
from services.common.config import exit_on_config_error, load_settings
from services.common.datasets import SnapshotStore
from services.common.dtypes import resolve_dtype
from services.common.files import write_text_atomic
from services.common.logs import configure_logging, get_logger, log_fields
from services.common.models import (
    RewardModel,
    encode_prompts,
    load_causal_lm,
    load_tokenizer,
    pad_batch,
    resolve_device,
)
from services.common.rm_scoring import comparison_scores, pair_accuracy, score_texts
from services.policy.offline import sample_all

log = get_logger(__name__)


@dataclass
class GateEvalConfig:
    """prompts: held-out prompts for the policy gate (the cpu preset's 64 is the issue's floor);
    comparisons: held-out comparisons for the RM gate; sampling: max_new_tokens, seed, decode_rows
    (rows the engine decodes together; a response does not depend on it); batch_size: rows per
    forward pass (log-probabilities, RM scores)."""

    prompts: int = 64
    comparisons: int = 256
    max_prompt_tokens: int = 256
    max_new_tokens: int = 32
    batch_size: int = 16
    decode_rows: int = 64
    seed: int = 4321

    def validate(self) -> None:
        for name in ("prompts", "comparisons", "max_prompt_tokens", "max_new_tokens", "batch_size", "decode_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"gate config {name}={getattr(self, name)} must be at least 1")


PRESETS = {
    "tiny": dict(prompts=16, comparisons=32, max_prompt_tokens=48, max_new_tokens=12, batch_size=8, decode_rows=16),
    "cpu": dict(prompts=64, comparisons=128, max_prompt_tokens=96, max_new_tokens=32, batch_size=16, decode_rows=64),
    "gpu": dict(
        prompts=512, comparisons=1024, max_prompt_tokens=512, max_new_tokens=128, batch_size=64, decode_rows=128
    ),
}


def make_config(preset: str, overrides: list[str]) -> GateEvalConfig:
    values = dict(PRESETS[preset])
    known = {f.name: f.type for f in dataclasses.fields(GateEvalConfig)}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in known:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(known)}")
        values[key] = int(raw)
    cfg = GateEvalConfig(**values)
    cfg.validate()
    return cfg


# --- sampling, log-probabilities and scores -----------------------------------------
def sample(
    model, tok, settings, prompts: list[str], cfg: GateEvalConfig, label: str
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids up to and including EOS) per prompt, at temperature 1:
    prompt i with seed cfg.seed + i, whichever policy answers it (services/policy/offline.py)."""
    ids = encode_prompts(tok, prompts, cfg.max_prompt_tokens)
    seeds = [cfg.seed + i for i in range(len(ids))]
    samples = sample_all(
        model,
        tok,
        settings,
        ids,
        seeds,
        rows=cfg.decode_rows,
        max_new_tokens=cfg.max_new_tokens,
        temperature=1.0,
        return_logprobs=True,
        service="gate",
        version=label,
    )
    return [(prompt_ids, [t.id for t in s.tokens]) for prompt_ids, s in zip(ids, samples, strict=True)]


def cached_sample(
    cache_dir: Path, version: str, dtype: torch.dtype, prompts: list[str], cfg: GateEvalConfig, draw
) -> list[tuple[list[int], list[int]]]:
    """`draw()`'s samples of `version`, kept under `cache_dir`: a checkpoint is immutable and the
    samples are seeded, so the same policy on the same prompts gives the same rows. The policy a
    round promotes is the next round's incumbent, on the same held-out prompts: its samples come
    from here instead of another decode (and a gate job that runs again after a crash reuses its own)."""
    key = json.dumps([version, str(dtype), prompts, cfg.seed, cfg.max_new_tokens, cfg.max_prompt_tokens])
    path = cache_dir / f"{version}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    try:
        rows = json.loads(path.read_text())
        return [(list(p), list(r)) for p, r in rows]
    except (OSError, ValueError, TypeError):
        pass  # absent or unreadable (a half-written file): draw again
    rows = draw()
    write_text_atomic(path, json.dumps(rows))
    return rows


@torch.no_grad()
def response_logprob(
    model, rows: list[tuple[list[int], list[int]]], pad_id: int, batch: int, device: str
) -> list[float]:
    """Sum of log p(response token | prefix) per row."""
    out = []
    for b in range(0, len(rows), batch):
        chunk = rows[b : b + batch]
        ids, mask = pad_batch([p + r for p, r in chunk], pad_id, side="right")
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None].to(device)).squeeze(2)
        for i, (p, r) in enumerate(chunk):
            out.append(float(logp[i, len(p) - 1 : len(p) - 1 + len(r)].sum()) if r else 0.0)
    return out


# --- the job ----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.controller.gate_eval", description=__doc__.split("\n")[0])
    parser.add_argument("--candidate", required=True, help="the new policy (PPO)")
    parser.add_argument("--incumbent", required=True, help="the serving policy")
    parser.add_argument("--reference", required=True, help="the SFT policy, for the KL")
    parser.add_argument("--reward", required=True, help="the new reward model (the one PPO optimised)")
    parser.add_argument("--incumbent-reward", default="", help="the serving reward model, if any")
    parser.add_argument("--snapshot", required=True)
    parser.add_argument("--split", default="validation", choices=("validation", "test"))
    parser.add_argument("--result-file", required=True)
    parser.add_argument("--run-dir", default="")
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg = make_config(args.preset, args.set)
    except ValueError as err:
        parser.error(str(err))
    settings = exit_on_config_error(load_settings)
    configure_logging("gate", settings.log_level)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    dtype, why = resolve_dtype("auto", device)
    log_fields(log, logging.INFO, "gate evaluation dtype", dtype=str(dtype), reason=why)
    started = time.time()
    store, snapshots = CheckpointStore(settings.checkpoint_dir), SnapshotStore(settings.dataset_dir)
    for version in filter(None, (args.candidate, args.incumbent, args.reference, args.reward, args.incumbent_reward)):
        store.verify(version)

    comparisons = [
        c
        for c in snapshots.read(args.snapshot, args.split, "comparisons")
        if len({r["rank"] for r in c["responses"]}) > 1
    ][: cfg.comparisons]
    prompts = sorted({r["text"] for r in snapshots.read(args.snapshot, args.split, "prompts") if r["text"].strip()})
    prompts = prompts[: cfg.prompts]

    # Policies: sample, then the candidate's KL to the reference.
    tok = load_tokenizer(store.path(args.reference))
    rows = {}
    cache = settings.home / "cache" / "gate-samples"
    for name, version in (("candidate", args.candidate), ("incumbent", args.incumbent)):
        # The candidate's model is needed for its KL anyway; the incumbent's only on a cache miss.
        model = load_causal_lm(store.path(version), device=device, dtype=dtype) if name == "candidate" else None
        rows[name] = cached_sample(
            cache,
            version,
            dtype,
            prompts,
            cfg,
            lambda m=model, v=version, n=name: sample(
                m or load_causal_lm(store.path(v), device=device, dtype=dtype), tok, settings, prompts, cfg, n
            ),
        )
        if name == "candidate":
            logp = response_logprob(model, rows[name], tok.pad_token_id, cfg.batch_size, device)
        del model
    reference = load_causal_lm(store.path(args.reference), device=device, dtype=dtype)
    logp_ref = response_logprob(reference, rows["candidate"], tok.pad_token_id, cfg.batch_size, device)
    del reference
    kl = [a - b for a, b in zip(logp, logp_ref, strict=True)]
    texts = {
        name: [tok.decode(r, skip_special_tokens=True).strip() for _, r in rows[name]]
        for name in ("candidate", "incumbent")
    }

    # Reward models: the new one and the serving one, on the same responses and comparisons.
    scores: dict[str, dict[str, list[float]]] = {"candidate": {}, "incumbent": {}}
    rm_accuracy = {}
    for role, version in (("new_rm", args.reward), ("incumbent_rm", args.incumbent_reward)):
        if not version:
            continue
        rm_tok = load_tokenizer(store.path(version))
        rm = RewardModel.from_pretrained(store.path(version), device=device, dtype=dtype)
        for name in ("candidate", "incumbent"):
            pairs = list(zip(prompts, texts[name], strict=True))
            scores[name][role] = score_texts(rm, rm_tok, pairs, device, cfg.batch_size)
        accuracy = pair_accuracy(comparisons, comparison_scores(rm, rm_tok, comparisons, device, cfg.batch_size))
        rm_accuracy[role] = {"version": version, **accuracy}
        del rm

    result = {
        "snapshot": args.snapshot,
        "split": args.split,
        "config": dataclasses.asdict(cfg),
        "dtype": str(dtype),
        "rm_accuracy": rm_accuracy,
        "policy": {
            "candidate": args.candidate,
            "incumbent": args.incumbent,
            "reference": args.reference,
            "prompts": len(prompts),
            "scores": scores,
            "kl_to_reference": kl,
            "mean_kl_to_reference": sum(kl) / len(kl) if kl else float("nan"),
        },
        "wall_s": round(time.time() - started, 1),
    }
    if args.run_dir:
        run_dir = Path(args.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "samples.jsonl", "w") as fh:
            for i, p in enumerate(prompts):
                fh.write(json.dumps({"prompt": p, **{n: texts[n][i] for n in texts}, "kl": kl[i]}) + "\n")
    out = Path(args.result_file)
    write_text_atomic(out, json.dumps(result, indent=2))
    log_fields(log, logging.INFO, "gate evaluation done", result_file=str(out), wall_s=result["wall_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
