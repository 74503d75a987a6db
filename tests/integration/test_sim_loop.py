"""Simulated users and labelers drive the real FeedbackService and
PolicyService (tiny model), and their events land on the real broker."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import grpc
import pytest

from services.common.bus import read_topic
from services.feedback import server as feedback_server
from services.policy import server as policy_server
from services.sim.labelers import LabelerPool, QueuedPrompt, read_prompt_events
from services.sim.tasks import gold_ranks, gold_score
from services.sim.users import make_population, submit_prompts
from tests.conftest import make_settings

EMAIL = re.compile(r"[\w.]+@example\.com")


@pytest.fixture
def stack(tmp_path, broker, tiny_model_dir):
    """Users + labelers with their tokens, and a live FeedbackService."""
    population = make_population(seed=5, n_users=6, n_prompts=240, heavy_prompts=205, n_labelers=2)
    tokens = population.write_tokens(tmp_path / "tokens.json")
    settings = make_settings(tmp_path / "home", broker, RLHF_TOKENS_FILE=str(tokens))
    feedback = feedback_server.start(settings)
    channel = grpc.insecure_channel(f"127.0.0.1:{feedback.port}")
    yield settings, population, channel
    channel.close()
    feedback.stop()


def test_users_log_prompts_and_labelers_demonstrate(stack):
    settings, population, channel = stack
    logged = submit_prompts(channel, population, progress=False)
    assert len(logged) == 240 and not any(p.duplicate for p in logged)

    # The broker holds exactly what the users sent, under the token's identity.
    events = read_prompt_events(settings)
    assert len(events) == 240
    assert {e.prompt_id for e in events} == {p.event_id for p in logged}
    sent = {p.event_id: p.prompt for p in logged}
    assert all(sent[e.prompt_id].user_id == e.user_id and sent[e.prompt_id].text == e.text for e in events)
    per_user = Counter(e.user_id for e in events)
    assert max(per_user.values()) == 205 and len(per_user) == 6
    assert any(EMAIL.search(e.text) for e in events)
    assert any(p.prompt.kind == "near_duplicate" for p in logged)

    # Re-running the simulation re-sends the same request ids: nothing new is written.
    again = submit_prompts(channel, population, population.prompts[:5], progress=False)
    assert all(p.duplicate for p in again) and [p.event_id for p in again] == [p.event_id for p in logged[:5]]

    pool = LabelerPool(population, channel, prompts=events, seed=1)
    stats = pool.demonstrate(6, progress=False)
    assert stats.submitted == 6 and stats.mean_gold == 1.0
    demos = read_topic(settings, "demonstrations")
    assert len(demos) == 6
    assert {d.labeler_id for d in demos} == {"labeler-0", "labeler-1"}
    assert {d.prompt_id for d in demos} <= {e.prompt_id for e in events}
    assert all(gold_score(d.prompt_text, d.response) == 1.0 for d in demos)
    # Round-robin over users: the six demonstrations cover all six users.
    assert len({next(e.user_id for e in events if e.prompt_id == d.prompt_id) for d in demos}) == 6


def test_a_user_token_cannot_submit_labels(stack):
    settings, population, channel = stack
    impostor = dataclasses.replace(population, labelers=population.users[:1])  # a user posing as a labeler
    pool = LabelerPool(impostor, channel, prompts=[QueuedPrompt("", "user-000", "Describe rain in at most 8 words.")])
    with pytest.raises(grpc.RpcError) as err:
        pool.demonstrate(1, progress=False)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert read_topic(settings, "demonstrations") == []


def test_labelers_rank_k_policy_samples_by_gold_score(stack):
    settings, population, channel = stack
    logged = submit_prompts(channel, population, population.prompts[:40], progress=False)
    policy = policy_server.start(settings, http_port=None)
    policy_channel = grpc.insecure_channel(f"127.0.0.1:{policy.port}")
    try:
        pool = LabelerPool(population, channel, policy_channel, prompts=read_prompt_events(settings), seed=2)
        stats = pool.compare(8, k=4, max_new_tokens=12, temperature=1.0, concurrency=4, progress=False)
    finally:
        policy_channel.close()
        policy.stop()
    # The tiny random model often gives K answers of equal gold score; those are skipped.
    assert stats.submitted + stats.skipped_all_tied == 8 and stats.submitted >= 2
    assert stats.policy_versions == {policy.version}

    comparisons = read_topic(settings, "comparisons")
    assert len(comparisons) == stats.submitted
    logged_ids = {p.event_id for p in logged}
    for c in comparisons:
        assert c.prompt_id in logged_ids and c.labeler_id in {"labeler-0", "labeler-1"}
        texts = [r.text for r in c.responses]
        assert 2 <= len(texts) <= 4 and len(set(texts)) == len(texts)
        assert [r.rank for r in c.responses] == gold_ranks(c.prompt_text, texts)
        assert len({r.rank for r in c.responses}) > 1  # all-tied rankings are never sent
        assert {r.policy_version for r in c.responses} == {policy.version}
