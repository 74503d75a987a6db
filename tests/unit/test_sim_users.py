"""The simulated population: skew, heavy users, near-duplicates, PII, determinism."""

from __future__ import annotations

import os
import re

import pytest

from services.common.auth import load_tokens
from services.common.config import load_settings
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


def test_run_labelers_refuses_an_empty_team_and_an_unknown_task_kind():
    import grpc

    from services.sim.labelers import run_labelers

    channel = grpc.insecure_channel("127.0.0.1:9")  # lazy: never dialled, every call is refused before it
    labelers = make_population(seed=0, n_users=5, n_prompts=20, heavy_users=0).labelers
    with pytest.raises(ValueError, match="at least one labeler"):
        run_labelers(channel, [], 1, progress=False)
    with pytest.raises(ValueError, match="TASK_KIND_REVIEW"):
        run_labelers(channel, labelers, 1, kind="review", progress=False)
    channel.close()


@pytest.mark.parametrize("k, message", [("10", "above the maximum 9"), ("3", "below the minimum 4")])
def test_comparison_k_outside_4_to_9_is_refused_by_the_configuration(k, message):
    from services.common.config import ConfigError

    with pytest.raises(ConfigError, match=f"RLHF_LABELING_K={k} is {message}"):
        load_settings({"RLHF_LABELING_K": k})
