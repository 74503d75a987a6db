"""The playground's HTTP API against the real PolicyService, FeedbackService,
LabelingService and broker: streamed answers, the labeling queue's tasks and
their submissions, and refusals that show the service's message and write nothing.

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
from services.labeling import server as labeling_server
from services.playground import app as playground_app
from services.policy import server as policy_server
from tests.conftest import make_settings

TOKENS = "tok-lab=lab1:labeler,tok-lab2=lab2:labeler,tok-user=u1:user"
LAB = {"Authorization": "Bearer tok-lab"}
# Greedy decoding of the tiny model never stops early: an answer this long keeps
# a policy row busy for many seconds, so a freed slot can only mean a cancel.
LONG_ANSWER = 2000
FREED_WITHIN_S = 3.0
USER = {"Authorization": "Bearer tok-user"}
LAB2 = {"Authorization": "Bearer tok-lab2"}


@dataclass
class Stack:
    settings: Settings  # targets point at the running services
    policy: object
    feedback: object
    labeling: object
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
        policy_target=f"127.0.0.1:{policy.port}",
        feedback_target=f"127.0.0.1:{feedback.port}",
        labeling_demonstration_share=0.0,
        labeling_max_new_tokens=8,
    )
    labeling = labeling_server.start(settings, port=0)
    settings = settings.with_overrides(labeling_target=f"127.0.0.1:{labeling.port}")
    web = playground_app.start(settings, port=0)
    yield Stack(settings, policy, feedback, labeling, web)
    web.stop()
    labeling.stop()
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
    assert empty.status_code == 422 and empty.json()["error"]["message"].startswith("prompt:")


def next_task(api, headers=LAB, timeout: float = 60.0) -> dict:
    """The next task, once the LabelingService has read the logged prompts."""
    deadline = time.monotonic() + timeout
    while True:
        reply = api.get("/api/task", headers=headers)
        if reply.status_code != 404 or time.monotonic() > deadline:
            assert reply.status_code == 200, reply.text
            return reply.json()
        time.sleep(0.2)


def test_a_task_from_a_logged_prompt_judged_and_submitted_whole(playground_stack, api):
    settings = playground_stack.settings
    logged = api.post("/api/generate", json={"prompt": "Name a colour.", "max_new_tokens": 2}, headers=USER)
    assert logged.status_code == 200
    task = next_task(api)
    assert task["kind"] == "comparison" and len(task["samples"]) == 4 and task["lease_expires_unix_ms"] > 0
    judgements = [
        {"sample_id": s["sample_id"], "likert": lk, "rank": r, "flags": f}
        for s, lk, r, f in zip(
            task["samples"], [6, 5, 2, 2], [1, 1, 2, 3], [[], ["LABEL_FLAG_EXPRESSES_OPINION"], [], []], strict=True
        )
    ]
    before = len(read_events(settings, "comparisons"))

    bad = [dict(j) for j in judgements]
    bad[2]["likert"] = 9
    refused = api.post("/api/task", json={"task_id": task["task_id"], "judgements": bad}, headers=LAB)
    assert refused.status_code == 422 and refused.json()["error"]["service"] == "labeling"
    assert refused.json()["error"]["message"].startswith("judgements[2].likert: is 9")
    other = api.post("/api/task", json={"task_id": task["task_id"], "judgements": judgements}, headers=LAB2)
    assert other.status_code == 403 and "not leased to lab2" in other.json()["error"]["message"]
    assert len(read_events(settings, "comparisons")) == before  # nothing written

    first = api.post("/api/task", json={"task_id": task["task_id"], "judgements": judgements}, headers=LAB).json()
    again = api.post("/api/task", json={"task_id": task["task_id"], "judgements": judgements}, headers=LAB).json()
    assert again["event_id"] == first["event_id"] and (first["duplicate"], again["duplicate"]) == (False, True)
    [event] = [e for e in read_events(settings, "comparisons") if e.event_id == first["event_id"]]
    assert (event.labeler_id, event.task_id, event.prompt_text) == ("lab1", task["task_id"], task["prompt_text"])
    assert [(r.rank, r.likert, list(r.flags)) for r in event.responses] == [
        (1, 6, []),
        (1, 5, [9]),
        (2, 2, []),
        (3, 2, []),
    ]
    assert {r.policy_version for r in event.responses} == {playground_stack.policy.version}

    stats = api.get("/api/stats", headers=LAB)
    assert stats.status_code == 200 and stats.json()["versions"][0]["samples"] == 4
    assert api.get("/api/stats", headers=USER).status_code == 403
