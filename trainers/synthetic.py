"""A synthetic dataset snapshot with a learnable preference, for the trainers'
tests and bench/train.

Responses are short strings of words. Labelers (here: a rule) prefer
responses with more "good" words, so a reward model can learn the rule and
held-out accuracy means something. Equal counts are ties (same rank).
Prompts come from users `u<n>`; the split is by user, as the real dataset
builder does it, so validation users never appear in train.
"""

from __future__ import annotations

import random
from pathlib import Path

from services.common.datasets import KINDS, SnapshotStore

GOOD = ("great", "clear", "helpful", "kind", "precise", "honest")
NEUTRAL = ("the", "a", "answer", "idea", "text", "point", "so", "and", "then", "it")
TOPICS = ("the sea", "a cat", "rain", "mountains", "coffee", "trains", "music", "gardens", "stars", "bread")


def response_with(rng: random.Random, n_good: int, length: int) -> str:
    words = [rng.choice(GOOD) for _ in range(n_good)] + [rng.choice(NEUTRAL) for _ in range(length - n_good)]
    rng.shuffle(words)
    return " ".join(words)


def records(
    n_prompts: int,
    k_min: int = 4,
    k_max: int = 9,
    ties: bool = True,
    seed: int = 0,
    length: int = 8,
    users: int = 10,
    val_fraction: float = 0.2,
) -> dict:
    """{split: {kind: [records]}} with prompts, demonstrations and K-way comparisons."""
    rng = random.Random(seed)
    n_val_users = max(1, round(users * val_fraction))
    data: dict = {s: {kind: [] for kind in KINDS} for s in ("train", "validation")}
    for i in range(n_prompts):
        user = f"u{i % users}"
        split = "validation" if i % users < n_val_users else "train"
        text = f"Write a short note about {rng.choice(TOPICS)} ({i})."
        base = {"prompt_id": f"p{i}", "user_id": user}
        data[split]["prompts"].append({**base, "event_id": f"e{i}", "text": text, "source": "synthetic"})
        data[split]["demonstrations"].append(
            {
                **base,
                "event_id": f"d{i}",
                "labeler_id": "l0",
                "prompt_text": text,
                "response": response_with(rng, length, length),
            }
        )
        k = rng.randint(k_min, k_max)
        goods = [rng.randint(0, length) for _ in range(k)] if ties else rng.sample(range(length + 1), k)
        order = sorted(set(goods), reverse=True)
        responses = [
            {"text": response_with(rng, g, length), "policy_version": "synthetic", "rank": order.index(g) + 1}
            for g in goods
        ]
        data[split]["comparisons"].append(
            {**base, "event_id": f"c{i}", "labeler_id": "l0", "prompt_text": text, "responses": responses}
        )
    return data


def write_snapshot(root: Path | str, n_prompts: int, **kwargs) -> str:
    """Write the snapshot into a SnapshotStore at `root`; return its id."""
    return SnapshotStore(root).write(records(n_prompts, **kwargs), rules={"synthetic": True})["snapshot_id"]
