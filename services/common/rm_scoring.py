"""Scoring responses with a reward model, and how well the scores order ranked comparisons.

Shared by the gate job (services/controller/gate_eval.py) and the demo's
reports (services/sim/report.py, services/sim/rounds.py), so that the gate
and the report measure an RM's accuracy the same way.

- `score_texts` scores (prompt, response) pairs at each response's last real
  token, in batches of similar length (sorted, so little of a batch is
  padding; a comparison's K responses share one pass over their prompt), and
  returns the scores in the caller's order.
- `comparison_scores` scores every response of every comparison once (a
  response that recurs, as in a task two labelers ranked, once in all).
- `pair_accuracy` counts, over every non-tie pair of a comparison's
  responses, how often the better-ranked one scored higher (equal scores
  count half). It takes the scores, not the model, so one scoring pass serves
  several rankings of the same responses (the labelers' and the gold one).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm import tqdm

from services.common.models import RewardModel, encode_prompt_response, pad_batch, render_prompt

MAX_TOKENS = 512


@torch.no_grad()
def score_texts(
    rm: RewardModel,
    tok,
    pairs: Sequence[tuple[str, str]],
    device: str,
    batch: int = 16,
    max_tokens: int = MAX_TOKENS,
    desc: str | None = None,
    share_prompts: bool = True,
) -> list[float]:
    """The RM's score of each (prompt, response), in the order given (`desc`: a progress bar).

    A pair that occurs more than once (a task two labelers ranked) is scored
    once. A prompt with several responses (a comparison's K) is run once for
    all of them (RewardModel.score_after_prefixes): the prompt is most of each
    sequence. Other pairs go in batches of similar length (sorted, so little of
    a batch is padding). `share_prompts=False` scores every pair as a whole
    sequence (bench/rm_scoring's baseline)."""
    unique = list(dict.fromkeys(pairs))
    by_prompt: dict[str, list[str]] = {}
    for prompt, response in unique:
        by_prompt.setdefault(prompt, []).append(response)
    whole: list[tuple[tuple[str, str], list[int]]] = []  # (pair, its token ids)
    shared: list[tuple[list[tuple[str, str]], list[int], list[list[int]]]] = []  # (pairs, prompt ids, suffixes)
    for prompt, responses in by_prompt.items():
        rendered = render_prompt(tok, prompt)
        seqs = [encode_prompt_response(tok, rendered, r, max_tokens) for r in responses]
        prefix = tok(rendered, add_special_tokens=False).input_ids
        group = [(prompt, r) for r in responses]
        # Shared only where no sequence lost the start of its prompt to max_tokens.
        intact = all(len(s) > len(prefix) and s[: len(prefix)] == prefix for s in seqs)
        if share_prompts and len(responses) > 1 and intact:
            shared.append((group, prefix, [s[len(prefix) :] for s in seqs]))
        else:
            whole.extend(zip(group, seqs, strict=True))
    whole.sort(key=lambda item: len(item[1]))
    shared.sort(key=lambda item: len(item[1]) + max(map(len, item[2])))
    jobs: list[tuple[list[tuple[str, str]], Callable[[], torch.Tensor]]] = []
    for b in range(0, len(whole), batch):
        chunk = whole[b : b + batch]
        ids, mask = pad_batch([seq for _, seq in chunk], tok.pad_token_id, side="right")
        jobs.append(([pair for pair, _ in chunk], lambda ids=ids, mask=mask: rm.score(ids.to(device), mask.to(device))))
    while shared:  # whole prompts, about `batch` responses a pass
        take = 1
        while take < len(shared) and sum(len(g[2]) for g in shared[: take + 1]) <= batch:
            take += 1
        groups, shared = shared[:take], shared[take:]
        owners = [i for i, g in enumerate(groups) for _ in g[2]]
        jobs.append(
            (
                [pair for g in groups for pair in g[0]],
                lambda groups=groups, owners=owners: rm.score_after_prefixes(
                    [g[1] for g in groups], [s for g in groups for s in g[2]], owners, tok.pad_token_id
                ),
            )
        )
    scored: dict[tuple[str, str], float] = {}
    for chunk_pairs, run in tqdm(jobs, desc=desc, unit="batch", disable=desc is None):
        scored.update(zip(chunk_pairs, run().float().tolist(), strict=True))
    return [scored[pair] for pair in pairs]


def comparison_scores(
    rm: RewardModel,
    tok,
    comparisons: Sequence[Mapping[str, Any]],
    device: str,
    batch: int = 16,
    desc: str | None = None,
) -> list[list[float]]:
    """Every response of every comparison scored once: one list per comparison."""
    flat = [(c["prompt_text"], r["text"]) for c in comparisons for r in c["responses"]]
    scores = iter(score_texts(rm, tok, flat, device, batch, desc=desc))
    return [[next(scores) for _ in c["responses"]] for c in comparisons]


def pair_accuracy(comparisons: Sequence[Mapping[str, Any]], scores: Sequence[Sequence[float]]) -> dict[str, Any]:
    """{"accuracy", "correct", "pairs", "comparisons"} of these scores against the comparisons' ranks."""
    if len(scores) != len(comparisons):
        raise ValueError(f"{len(scores)} score lists for {len(comparisons)} comparisons")
    correct, pairs = 0.0, 0
    for c, s in zip(comparisons, scores, strict=True):
        ranks = [r["rank"] for r in c["responses"]]
        for i in range(len(ranks)):
            for j in range(i + 1, len(ranks)):
                if ranks[i] == ranks[j]:
                    continue
                better, worse = (s[i], s[j]) if ranks[i] < ranks[j] else (s[j], s[i])
                correct += 1.0 if better > worse else 0.5 if better == worse else 0.0
                pairs += 1
    return {
        "accuracy": correct / pairs if pairs else float("nan"),
        "correct": correct,
        "pairs": pairs,
        "comparisons": len(comparisons),
    }
