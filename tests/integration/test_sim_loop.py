"""Simulated users and labelers drive the real FeedbackService, PolicyService
(tiny model) and LabelingService, and their events land on the real broker.
The labelers only call the LabelingService; the tests read the broker to check
what was written."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import grpc
import pytest

from services.common.bus import read_topic
from services.feedback import server as feedback_server
from services.labeling import server as labeling_server
from services.policy import server as policy_server
from services.sim.labelers import labeling_stats, run_labelers, versions_judged_between, wait_for_prompts
from services.sim.tasks import gold_ranks, gold_score
from services.sim.users import make_population, submit_prompts
from tests.conftest import make_settings

EMAIL = re.compile(r"[\w.]+@example\.com")


@pytest.fixture
def stack(tmp_path, broker, tiny_model_dir):
    """Users + labelers with their tokens; live Feedback-, Policy- and LabelingService."""
    population = make_population(seed=5, n_users=6, n_prompts=240, heavy_prompts=205, n_labelers=2)
    tokens = population.write_tokens(tmp_path / "tokens.json")
    settings = make_settings(
        tmp_path / "home",
        broker,
        RLHF_TOKENS_FILE=str(tokens),
        RLHF_LABELING_OVERLAP_SHARE="0",
        RLHF_LABELING_MAX_NEW_TOKENS="12",
    )
    feedback = feedback_server.start(settings)
    policy = policy_server.start(settings, port=0, http_port=None, follow=False)
    settings = dataclasses.replace(
        settings, feedback_target=f"127.0.0.1:{feedback.port}", policy_target=f"127.0.0.1:{policy.port}"
    )
    labeling = labeling_server.start(settings, port=0)
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for port in (feedback.port, labeling.port)]
    yield settings, population, *channels, policy
    for channel in channels:
        channel.close()
    labeling.stop()
    policy.stop()
    feedback.stop()


def test_users_log_prompts_and_labelers_demonstrate(stack):
    settings, population, channel, labeling, _ = stack
    logged = submit_prompts(channel, population, progress=False)
    assert len(logged) == 240 and not any(p.duplicate for p in logged)

    # The broker holds exactly what the users sent, under the token's identity.
    events = read_topic(settings, "prompts")
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

    # The LabelingService reads them itself, under the dataset rules: the heavy user's 205 are capped at 200,
    # and near-duplicates (same prefix) are queued once.
    queued = wait_for_prompts(labeling, population.labelers[0].token)
    near_duplicates = sum(p.prompt.kind == "near_duplicate" for p in logged)
    assert 200 < queued <= 240 - 5 and queued < 240 - near_duplicates + 1, (queued, near_duplicates)

    # Demonstrations for tasks the LabelingService drew from those logged prompts.
    run = run_labelers(labeling, population.labelers, 6, kind="demonstration", seed=1, wait_s=30, progress=False)
    assert run.demonstrations == 6 and run.comparisons == 0 and run.duplicates == 0
    demos = read_topic(settings, "demonstrations")
    assert len(demos) == 6 and len({d.prompt_id for d in demos}) == 6  # never the same prompt twice
    assert {d.labeler_id for d in demos} <= {"labeler-0", "labeler-1"}
    assert Counter(d.labeler_id for d in demos) == run.per_labeler
    assert {d.prompt_id for d in demos} <= {e.prompt_id for e in events}
    assert all(d.task_id for d in demos)  # written by the service for its task
    assert all(gold_score(d.prompt_text, d.response) == 1.0 for d in demos)


def test_a_user_token_cannot_take_labeling_tasks(stack):
    settings, population, channel, labeling, _ = stack
    submit_prompts(channel, population, population.prompts[:5], progress=False)
    impostor = population.users[:1]  # a user posing as a labeler
    with pytest.raises(grpc.RpcError) as err:
        run_labelers(labeling, impostor, 1, kind="demonstration", wait_s=5, progress=False)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert read_topic(settings, "demonstrations") == []


def _dense(ranks: list[int]) -> list[int]:
    levels = sorted(set(ranks))
    return [levels.index(r) + 1 for r in ranks]


def test_labelers_rank_the_services_k_policy_samples(stack):
    settings, population, channel, labeling, policy = stack
    logged = submit_prompts(channel, population, population.prompts[:40], progress=False)
    token = population.labelers[0].token
    before = labeling_stats(labeling, token)
    # noise=0: each labeler ranks by the gold preference exactly, so the stored ranks can be checked.
    run = run_labelers(labeling, population.labelers, 8, kind="comparison", noise=0.0, wait_s=30, progress=False)
    assert run.comparisons == 8
    assert versions_judged_between(before, labeling_stats(labeling, token)) == [policy.version]

    comparisons = read_topic(settings, "comparisons")
    assert len(comparisons) == 8
    logged_ids = {p.event_id for p in logged}
    for c in comparisons:
        assert c.prompt_id in logged_ids and c.labeler_id in {"labeler-0", "labeler-1"}
        texts = [r.text for r in c.responses]
        assert len(texts) == 4 and len({t.strip() for t in texts}) == 4  # K distinct non-empty samples
        assert _dense([r.rank for r in c.responses]) == _dense(gold_ranks(c.prompt_text, texts))
        assert {r.policy_version for r in c.responses} == {policy.version}  # the server's record
        assert all(1 <= r.likert <= 7 and r.sample_id for r in c.responses)
