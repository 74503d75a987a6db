"""The playground's HTTP API against the real PolicyService, FeedbackService
and broker: streamed answers, K samples, submissions, and refusals that
show the service's message and write nothing.

`playground_stack` and `read_events` are reused by the e2e playground tests.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx
import pytest

from services.common.bus import read_topic
from services.common.config import Settings
from services.feedback import server as feedback_server
from services.playground import app as playground_app
from services.policy import server as policy_server
from tests.conftest import make_settings

TOKENS = "tok-lab=lab1:labeler,tok-user=u1:user"
LAB = {"Authorization": "Bearer tok-lab"}
# Greedy decoding of the tiny model never stops early: an answer this long keeps
# a policy row busy for many seconds, so a freed slot can only mean a cancel.
LONG_ANSWER = 2000
FREED_WITHIN_S = 3.0
USER = {"Authorization": "Bearer tok-user"}


@dataclass
class Stack:
    settings: Settings  # targets point at the running services
    policy: object
    feedback: object
    web: playground_app.PlaygroundHandle


@pytest.fixture(scope="module")
def playground_stack(tmp_path_factory, broker, tiny_model_dir):
    """Real policy + feedback services on free ports, and the playground in front of them."""
    settings = make_settings(
        tmp_path_factory.mktemp("playground"),
        broker,
        RLHF_TOKENS=TOKENS,
        RLHF_DEFAULT_MAX_NEW_TOKENS="8",
        RLHF_MAX_NEW_TOKENS_LIMIT=str(LONG_ANSWER),
    )
    policy = policy_server.start(settings, port=0, http_port=None)
    feedback = feedback_server.start(settings, port=0)
    settings = settings.with_overrides(
        policy_target=f"127.0.0.1:{policy.port}", feedback_target=f"127.0.0.1:{feedback.port}"
    )
    web = playground_app.start(settings, port=0)
    yield Stack(settings, policy, feedback, web)
    web.stop()
    feedback.stop()
    policy.stop()


def read_events(settings: Settings, key: str) -> list:
    """Every event on one of the test's topics, from the beginning up to its current end.

    Feedback replies only after the broker acknowledged a write, so what a
    reply reported is already below the end offset when this runs.
    """
    return read_topic(settings, key)


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    events, name = [], "message"
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            events.append((name, json.loads(line[5:])))
    return events


@pytest.fixture(scope="module")
def api(playground_stack):
    with httpx.Client(base_url=playground_stack.web.url, timeout=60) as client:
        yield client


def test_prompt_streams_tokens_and_is_logged(playground_stack, api):
    with api.stream(
        "POST",
        "/api/generate",
        json={"prompt": "Write a haiku about the sea.", "request_id": "req-stream-1"},
        headers=USER,
    ) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    names = [n for n, _ in events]
    assert names[0] == "prompt" and names[-1] == "done" and names.count("token") >= 2, names
    done = events[-1][1]
    assert done["model_version"] == playground_stack.policy.version
    assert "".join(d["text"] for n, d in events if n == "token") == done["text"]

    [logged] = [p for p in read_events(playground_stack.settings, "prompts") if p.event_id == events[0][1]["event_id"]]
    assert (logged.user_id, logged.text, logged.source, dict(logged.metadata)) == (
        "u1",
        "Write a haiku about the sea.",
        "playground",
        {"mode": "prompt"},
    )


def wait_running(stack: Stack, want: int, timeout: float = FREED_WITHIN_S) -> int:
    """The policy engine's running rows, once they equal `want` (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while (running := stack.policy.backend.engine.stats()["running"]) != want and time.monotonic() < deadline:
        time.sleep(0.01)
    return running


def test_a_reader_that_leaves_frees_the_policys_slot(playground_stack, api):
    body = {"prompt": "Count to a thousand.", "max_new_tokens": LONG_ANSWER, "temperature": 0}
    with api.stream("POST", "/api/generate", json=body, headers=USER) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("event: token"):
            pass
        assert wait_running(playground_stack, 1) == 1  # the answer is being generated
    # the browser's Stop (or a closed tab) drops the connection: the policy stops at once
    assert wait_running(playground_stack, 0) == 0


def test_chat_sends_the_history_and_logs_it(playground_stack, api):
    turns = [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a planet."},
    ]
    with api.stream("POST", "/api/generate", json={"messages": turns, "max_new_tokens": 4}, headers=USER) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert events[-1][0] == "done" and events[-1][1]["completion_tokens"] <= 4
    [logged] = [p for p in read_events(playground_stack.settings, "prompts") if p.event_id == events[0][1]["event_id"]]
    assert [(m.role, m.content) for m in logged.messages] == [(t["role"], t["content"]) for t in turns]
    assert logged.metadata["mode"] == "chat"

    empty = api.post("/api/generate", json={"prompt": "  "}, headers=USER)
    assert empty.status_code == 400 and empty.json()["error"]["message"].startswith("prompt:")


def test_k_samples_ranked_labeled_and_demonstrated(playground_stack, api):
    reply = api.post("/api/samples", json={"prompt": "Name a colour.", "k": 5, "temperature": 1.0}, headers=LAB)
    assert reply.status_code == 200, reply.text
    batch = reply.json()
    texts = [s["text"] for s in batch["samples"]]
    assert len(texts) == 5 and batch["model_version"] == playground_stack.policy.version
    ranks = [2, 1, 3, 1, 4]  # samples 1 and 3 tie for best
    body = {
        "request_id": "cmp-1",
        "prompt_id": batch["prompt_event_id"],
        "prompt_text": "Name a colour.",
        "responses": [{"text": t, "policy_version": batch["model_version"], "rank": r} for t, r in zip(texts, ranks)],
    }
    first = api.post("/api/comparison", json=body, headers=LAB).json()
    again = api.post("/api/comparison", json=body, headers=LAB).json()
    assert again["event_id"] == first["event_id"] and (first["duplicate"], again["duplicate"]) == (False, True)
    label = api.post(
        "/api/labels",
        json={
            "request_id": "lab-1",
            "prompt_id": batch["prompt_event_id"],
            "response": texts[1],
            "policy_version": batch["model_version"],
            "likert": 6,
            "flags": ["LABEL_FLAG_EXPRESSES_OPINION"],
        },
        headers=LAB,
    )
    demo = api.post(
        "/api/demonstration",
        json={"request_id": "demo-1", "prompt_id": batch["prompt_event_id"], "response": "Teal."},
        headers=LAB,
    )
    assert label.status_code == demo.status_code == 200, (label.text, demo.text)

    settings = playground_stack.settings
    prompt = next(p for p in read_events(settings, "prompts") if p.event_id == batch["prompt_event_id"])
    assert (prompt.text, dict(prompt.metadata)) == ("Name a colour.", {"mode": "label"})
    [comparison] = [c for c in read_events(settings, "comparisons") if c.event_id == first["event_id"]]
    assert comparison.labeler_id == "lab1" and comparison.prompt_id == batch["prompt_event_id"]
    assert [(r.text, r.rank, r.policy_version) for r in comparison.responses] == [
        (t, r, batch["model_version"]) for t, r in zip(texts, ranks)
    ]
    [labels] = [e for e in read_events(settings, "labels") if e.event_id == label.json()["event_id"]]
    assert (labels.response, labels.likert, list(labels.flags)) == (texts[1], 6, [9])
    [demonstration] = [e for e in read_events(settings, "demonstrations") if e.event_id == demo.json()["event_id"]]
    assert demonstration.response == "Teal."


def test_bad_submissions_show_the_service_error_and_write_nothing(playground_stack, api):
    settings = playground_stack.settings
    before = {key: len(read_events(settings, key)) for key in ("prompts", "comparisons", "labels")}
    one = {
        "request_id": "bad-k",
        "prompt_text": "p",
        "responses": [{"text": "only one", "policy_version": "v", "rank": 1}],
    }
    reply = api.post("/api/comparison", json=one, headers=LAB)
    assert reply.status_code == 400
    assert reply.json()["error"] == {
        "code": "INVALID_ARGUMENT",
        "service": "feedback",
        "message": "responses: has 1 responses; K must be between 2 and 9",
    }

    incomplete = {
        "request_id": "bad-rank",
        "prompt_text": "p",
        "responses": [{"text": f"answer {i}", "policy_version": "v", "rank": r} for i, r in enumerate([1, 2, 0, 0])],
    }
    reply = api.post("/api/comparison", json=incomplete, headers=LAB)
    assert reply.status_code == 400 and reply.json()["error"]["service"] == "feedback"
    assert reply.json()["error"]["message"].startswith("responses[2].rank: is 0;")

    reply = api.post("/api/comparison", json={**incomplete, "request_id": "as-user"}, headers=USER)
    assert reply.status_code == 403 and reply.json()["error"]["code"] == "PERMISSION_DENIED"

    reply = api.post(
        "/api/labels",
        json={"request_id": "bad-likert", "prompt_text": "p", "response": "r", "policy_version": "v", "likert": 8},
        headers=LAB,
    )
    assert reply.status_code == 400 and "likert" in reply.json()["error"]["message"]

    reply = api.post("/api/samples", json={"prompt": "p", "k": 10}, headers=LAB)
    assert reply.status_code == 400 and "between 4 and 9" in reply.json()["error"]["message"]

    assert {key: len(read_events(settings, key)) for key in before} == before


def test_a_labeling_submission_is_written_whole_or_not_at_all(playground_stack, api):
    settings = playground_stack.settings
    responses = [{"text": f"colour {i}", "policy_version": "v1", "rank": i + 1} for i in range(4)]
    body = {
        "comparison": {"request_id": "sub-cmp", "prompt_text": "Name a colour.", "responses": responses},
        "labels": [
            {
                "request_id": "sub-lab-0",
                "prompt_text": "Name a colour.",
                "response": "colour 0",
                "policy_version": "v1",
                "likert": 9,
            }
        ],
        "demonstration": {"request_id": "sub-demo", "prompt_text": "Name a colour.", "response": "Teal."},
    }
    refused = api.post("/api/submission", json=body, headers=LAB)
    assert refused.status_code == 400 and refused.json()["error"]["message"].startswith("items[1].labels.likert")
    written = lambda: {
        e.request_id for k in ("comparisons", "labels", "demonstrations") for e in read_events(settings, k)
    }  # noqa: E731
    assert not written() & {
        "sub-cmp",
        "sub-lab-0",
        "sub-demo",
    }  # the good ranking before the bad labels is not written either

    body["labels"][0]["likert"] = 6
    replies = api.post("/api/submission", json=body, headers=LAB).json()["replies"]
    assert [r["duplicate"] for r in replies] == [False, False, False] and {
        "sub-cmp",
        "sub-lab-0",
        "sub-demo",
    } <= written()
    again = api.post("/api/submission", json=body, headers=LAB).json()["replies"]
    assert [r["event_id"] for r in again] == [r["event_id"] for r in replies] and all(r["duplicate"] for r in again)
    assert api.post("/api/submission", json={}, headers=LAB).status_code == 400
