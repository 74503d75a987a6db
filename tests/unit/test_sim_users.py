"""The simulated population: skew, heavy users, near-duplicates, PII, determinism."""

from __future__ import annotations

import os
import re

import pytest

from services.common.auth import load_tokens
from services.common.config import load_settings
from services.sim.labelers import QueuedPrompt, labelling_queue
from services.sim.users import make_population, zipf_counts

EMAIL = re.compile(r"[\w.]+@[\w.]+\.\w+")
PHONE = re.compile(r"\+1 555-\d{3}-\d{4}")


def test_population_has_heavy_users_near_duplicates_and_pii():
    pop = make_population(seed=3, n_users=30, n_prompts=900)
    counts = pop.counts()
    assert sum(counts.values()) == len(pop.prompts) == 900
    assert max(counts.values()) > 200
    assert min(counts.values()) >= 1
    near = [p for p in pop.prompts if p.kind == "near_duplicate"]
    assert len(near) >= 20
    for p in near:
        earlier = [
            q
            for q in pop.prompts[: pop.prompts.index(p)]
            if q.user_id == p.user_id and p.text.startswith(q.text) and q.text != p.text
        ]
        assert earlier, f"near-duplicate without an earlier original: {p.text!r}"
        assert len(earlier[0].text) >= 100  # a long shared prefix
    pii = [p for p in pop.prompts if p.kind == "pii"]
    assert len(pii) >= 20 and all(EMAIL.search(p.text) or PHONE.search(p.text) for p in pii)
    assert any(EMAIL.search(p.text) for p in pii) and any(PHONE.search(p.text) for p in pii)
    assert not any(EMAIL.search(p.text) or PHONE.search(p.text) for p in pop.prompts if p.kind == "fresh")


def test_zipf_skew():
    counts = zipf_counts(20, 600, 1.1, heavy=1, heavy_prompts=210)
    assert counts[0] == 210 and sum(counts) == 600
    light = counts[1:]
    assert light == sorted(light, reverse=True) and light[0] > 5 * light[-1]
    with pytest.raises(ValueError, match="n_prompts"):
        zipf_counts(20, 200, 1.1, heavy=1, heavy_prompts=210)


def test_deterministic_per_seed():
    a, b, c = make_population(seed=1), make_population(seed=1), make_population(seed=2)
    assert [(p.user_id, p.text, p.request_id) for p in a.prompts] == [
        (p.user_id, p.text, p.request_id) for p in b.prompts
    ]
    assert a.tokens() == b.tokens()
    assert [p.text for p in a.prompts] != [p.text for p in c.prompts]
    assert set(a.tokens()).isdisjoint(c.tokens())


def test_tokens_file_loads_into_settings(tmp_path):
    pop = make_population(seed=0, n_users=12, n_prompts=300, n_labelers=2)
    path = pop.write_tokens(tmp_path / "tokens.json")
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    tokens = load_tokens(load_settings({"RLHF_TOKENS_FILE": str(path)}))
    assert tokens == pop.tokens()
    assert {i.role for i in tokens.values()} == {"user", "labeler"}
    assert len({i.user_id for i in tokens.values()}) == 14
    assert pop.token_of("labeler-1") in tokens


def test_bad_rates_are_refused():
    with pytest.raises(ValueError, match="pii_rate"):
        make_population(pii_rate=1.5)


def test_labelling_queue_round_robins_users_and_skips_repeats():
    prompts = [QueuedPrompt(f"h{i}", "heavy", f"text {i}") for i in range(10)]
    prompts += [QueuedPrompt("l1", "light", "light text"), QueuedPrompt("l2", "light", "text 3")]
    queue = labelling_queue(prompts, seed=0)
    assert {queue[0].user_id, queue[1].user_id} == {"heavy", "light"}
    texts = [p.text for p in queue]
    assert len(texts) == len(set(texts)) == 11
    assert next(p for p in queue if p.text == "text 3").prompt_id == "h3"  # the first arrival of a repeated text
    assert labelling_queue(prompts, seed=0) == queue and labelling_queue(prompts, seed=1) != queue


def test_labeler_pool_refuses_bad_k_and_a_missing_policy():
    import grpc

    from services.sim.labelers import LabelerPool

    pop = make_population(seed=0, n_users=5, n_prompts=20, heavy_users=0)
    channel = grpc.insecure_channel("127.0.0.1:9")  # lazy: never dialled, every call is refused before it
    prompts = [QueuedPrompt("p1", "user-000", "Describe rain in at most 8 words.")]
    with pytest.raises(ValueError, match="PolicyService"):
        LabelerPool(pop, channel, prompts=prompts).compare(1)
    with pytest.raises(ValueError, match=r"k=10 must be in \[2, 9\]"):
        LabelerPool(pop, channel, channel, prompts=prompts).compare(1, k=10)
    with pytest.raises(ValueError, match="no labelers"):
        LabelerPool(make_population(seed=0, n_users=5, n_prompts=20, heavy_users=0, n_labelers=0), channel)
    channel.close()
