"""`python -m bench.rm_scoring [--quick]`: scoring ranked comparisons with a reward model.

The gate job's RM gate and the demo's reports score every response of the
held-out comparisons with one or two RMs, every round. A comparison is one
prompt and K responses, and the chat-templated prompt is most of each
sequence. `score_texts` (services/common/rm_scoring.py) runs each prompt once
and its K responses on its keys and values; the baseline, in the same run,
scores every (prompt, response) as a whole sequence in batches of similar
length, as it did before. Same model (the base preset's backbone with a fresh
head: speed does not depend on the head), same comparisons, same batch size
(16 rows), the dtype the gate would use on this machine. Baseline and
shared-prompt passes alternate for a few rounds; the median counts. Beside it:
the largest score difference between the two, and each one's mean error
against fp32 whole sequences (in bf16 both round, differently).

Comparisons: prompts of the demo's task suite (services/sim/tasks.py) with
K = 4 answers each of 3 to 20 words, like the cpu preset's samples.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from bench.common import MODEL_CACHE, print_table, write_results
from services.common.dtypes import cpu_capability, resolve_dtype
from services.common.models import RewardModel, ensure_preset, load_tokenizer
from services.common.rm_scoring import score_texts
from services.sim.tasks import sample_task, words, write_demonstration

K = 4
BATCH = 16


def comparisons(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, response) pairs: n prompts, K answers each, cut to 3..20 words."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = sample_task(rng).render()
        for _ in range(K):
            answer = write_demonstration(prompt, rng) + " " + write_demonstration(prompt, rng)
            pairs.append((prompt, " ".join(words(answer)[: rng.randint(3, 20)]) + "."))
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 comparisons, one round")
    args = parser.parse_args(argv)
    n, rounds = (16, 1) if args.quick else (64, 3)
    path = ensure_preset("base", MODEL_CACHE)
    dtype, why = resolve_dtype("auto", "cpu")
    torch.manual_seed(0)
    rm, tok = RewardModel.from_causal_lm(path).to(dtype=dtype).eval(), load_tokenizer(path)
    pairs = comparisons(n)
    times: dict[str, list[float]] = {"shared": [], "whole": []}
    scores = {}
    for r in range(rounds):
        for mode in ("whole", "shared"):
            t0 = time.perf_counter()
            scores[mode] = score_texts(rm, tok, pairs, "cpu", BATCH, share_prompts=mode == "shared")
            times[mode].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{rounds} {mode}: {times[mode][-1]:.2f} s", flush=True)
    diff = max(abs(a - b) for a, b in zip(scores["shared"], scores["whole"], strict=True))
    # Against fp32 whole sequences: in bf16 both paths round, differently; neither is the exact one.
    reference = score_texts(rm.float(), tok, pairs, "cpu", BATCH, share_prompts=False)
    error = {m: statistics.fmean(abs(a - b) for a, b in zip(scores[m], reference, strict=True)) for m in scores}
    shared, whole = statistics.median(times["shared"]), statistics.median(times["whole"])
    rows = [
        {"mode": "prompt once per comparison (now)", "seconds": shared, "responses_per_s": len(pairs) / shared},
        {"mode": "whole sequences (before)", "seconds": whole, "responses_per_s": len(pairs) / whole},
    ]
    print_table(f"bench/rm_scoring: {n} comparisons x K={K}, batch {BATCH}, {dtype}, median of {rounds}", rows)
    print(
        f"speed-up {whole / shared:.2f}x; largest score difference {diff:.2e}; mean |error| against fp32 whole "
        f"sequences: shared {error['shared']:.2e}, whole {error['whole']:.2e}",
        flush=True,
    )
    write_results(
        "rm_scoring",
        {
            "comparisons": n,
            "k": K,
            "batch": BATCH,
            "dtype": str(dtype),
            "dtype_reason": why,
            "cpu_capability": cpu_capability(),
            "rounds": rounds,
            "times_s": times,
            "max_score_diff": diff,
            "mean_abs_error_vs_fp32": error,
            "rows": [
                {
                    "what": f"RM scoring of {n} comparisons x K = {K} (the RM gate's and the report's work), {dtype}",
                    "result": f"{len(pairs) / shared:.0f} responses/s ({shared:.1f} s)",
                    "baseline": f"every response as a whole sequence (before): "
                    f"{len(pairs) / whole:.0f}/s ({whole:.1f} s)",
                    "ratio": round(whole / shared, 2),
                    "ratio_unit": " faster",
                    "ratio_note": f"; mean error vs fp32 {error['shared']:.1e} (before {error['whole']:.1e})",
                }
            ],
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
