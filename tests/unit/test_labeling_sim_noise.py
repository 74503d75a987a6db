"""The simulated labelers' noise model: deterministic per labeler and sample,
ties kept, and two labelers of the default team agreeing on roughly the
paper's share of pairs (synthetic gold scores, so no model is needed)."""

from __future__ import annotations

import random

from rlhf.v1 import labeling_pb2

from services.labeling.agreement import agreement
from services.sim.labelers import dense_ranks, noisy_team
from services.sim.users import SimUser

PROMPT = "Describe the ocean in at most 6 words."


def test_dense_ranks_tie_close_scores():
    assert dense_ranks([0.9, 0.1, 0.85, 0.5], tie_within=0.1) == [1, 3, 1, 2]
    assert dense_ranks([1.0, 1.0, 1.0], tie_within=0.1) == [1, 1, 1]


def test_judgements_are_deterministic_and_labelers_differ():
    team = noisy_team([SimUser(f"l{i}", "") for i in range(4)])
    assert len({round(t.noise, 6) for t in team}) == 4  # each its own level
    samples = [
        labeling_pb2.TaskSample(sample_id=f"s{i}", text=text)
        for i, text in enumerate(["Waves.", "The ocean is vast, blue and deep.", "Blue", "a b c d e f g h i j k l m n"])
    ]
    first = [list(t.judge(PROMPT, samples)) for t in team]
    assert first == [list(t.judge(PROMPT, samples)) for t in team]
    for judged in first:
        assert sorted(j.sample_id for j in judged) == [s.sample_id for s in samples]
        assert all(1 <= j.likert <= 7 and 1 <= j.rank <= 4 for j in judged)


def test_team_agreement_lands_near_the_papers_rate():
    """Words of varying length give varied gold scores: rank 4 of them, pairs of labelers, 600 tasks."""
    rng = random.Random(3)
    team = noisy_team([SimUser(f"l{i}", "") for i in range(6)])
    tasks = {}
    for t in range(600):
        texts = {" ".join(f"w{t}x{i}y{j}" for j in range(rng.randint(1, 14))) + "." for i in range(4)}
        samples = [labeling_pb2.TaskSample(sample_id=f"t{t}s{i}", text=x) for i, x in enumerate(sorted(texts))]
        a, b = rng.sample(team, 2)
        tasks[t] = {x.user_id: {j.sample_id: j.rank for j in x.judge(PROMPT, samples)} for x in (a, b)}
    result = agreement(tasks)
    assert 0.65 <= result.pairwise <= 0.82, result.pairwise
    assert 0.3 < result.kendall_tau_b < 0.9
