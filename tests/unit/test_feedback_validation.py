"""Request validation, event building and the idempotency cache of the FeedbackService."""

from __future__ import annotations

import threading

import pytest
from rlhf.v1 import events_pb2, feedback_pb2

from services.common.auth import Identity
from services.feedback.events import event_id_for, prepare
from services.feedback.idempotency import IdempotencyCache
from services.feedback.validation import InvalidField, Limits, locate_bad_utf8

LABELER = Identity("lab1", "labeler")
LIMITS = Limits(max_text_bytes=100, max_metadata_bytes=50)


def comparison(*ranked: tuple[str, int], **fields) -> feedback_pb2.SubmitComparisonRequest:
    responses = [events_pb2.RankedResponse(text=t, policy_version="v1", rank=r) for t, r in ranked]
    return feedback_pb2.SubmitComparisonRequest(request_id="r", prompt_id="ev-p", responses=responses, **fields)


def invalid_field(kind, request, identity=LABELER) -> str:
    with pytest.raises(InvalidField) as err:
        prepare(kind, request, identity, LIMITS)
    return str(err.value)


@pytest.mark.parametrize(
    "request_, expected",
    [
        (comparison(("a", 1)), "responses: has 1 responses; K must be between 2 and 9"),
        (comparison(*[(f"r{i}", i + 1) for i in range(10)]), "responses: has 10 responses"),
        (comparison(("a", 1), ("a ", 2)), "responses[1].text: duplicates responses[0].text"),
        (comparison(("a", 1), ("  ", 2)), "responses[1].text: must not be empty"),
        (comparison(("a", 1), ("b", 0)), "responses[1].rank: is 0"),
        (comparison(("a", 1), ("b", 3)), "responses[1].rank: is 3"),
        (comparison(("a", 2), ("b", 2)), "responses: the ranking has no best response"),
        (comparison(("a", 1), ("x" * 101, 2)), "responses[1].text: is 101 bytes; the limit is 100"),
        (feedback_pb2.SubmitComparisonRequest(request_id="r", responses=[]), "prompt_id: give prompt_id"),
    ],
)
def test_comparison_rules_name_the_field(request_, expected):
    assert invalid_field("comparisons", request_).startswith(expected)


def test_ties_are_accepted_and_recorded():
    prepared = prepare("comparisons", comparison(("a", 1), ("b", 1), ("c", 3)), LABELER, LIMITS)
    assert [r.rank for r in prepared.event.responses] == [1, 1, 3]


def test_labels_rules():
    ok = dict(request_id="r", prompt_text="p", response="x", policy_version="v1", likert=4)
    assert invalid_field("labels", feedback_pb2.SubmitLabelsRequest(**{**ok, "likert": 8})).startswith("likert: is 8")
    assert invalid_field("labels", feedback_pb2.SubmitLabelsRequest(**{**ok, "likert": 0})).startswith("likert: is 0")
    assert invalid_field("labels", feedback_pb2.SubmitLabelsRequest(**ok, flags=[2, 2])).startswith("flags[1]:")
    assert invalid_field("labels", feedback_pb2.SubmitLabelsRequest(**ok, flags=[99])).startswith("flags[0]: 99")
    assert invalid_field("labels", feedback_pb2.SubmitLabelsRequest(**{**ok, "policy_version": ""})).startswith(
        "policy_version: is required"
    )
    prepared = prepare("labels", feedback_pb2.SubmitLabelsRequest(**ok, flags=[1, 2]), LABELER, LIMITS)
    assert prepared.event.likert == 4 and list(prepared.event.flags) == [1, 2]


def test_prompt_rules():
    user = Identity("alice", "user")
    assert invalid_field("prompts", feedback_pb2.LogPromptRequest(request_id="r"), user).startswith(
        "text: give the prompt"
    )
    assert invalid_field("prompts", feedback_pb2.LogPromptRequest(request_id="r" * 129, text="t"), user).startswith(
        "request_id: is 129"
    )
    big_meta = feedback_pb2.LogPromptRequest(text="t", metadata={"k": "v" * 60})
    assert invalid_field("prompts", big_meta, user).startswith("metadata: is 61 bytes; the limit is 50")
    bad_role = feedback_pb2.LogPromptRequest(messages=[{"role": "robot", "content": "x"}])
    assert invalid_field("prompts", bad_role, user).startswith("messages[0].role")


def test_identity_comes_from_the_token_not_the_payload():
    user = Identity("alice", "user")
    prompt = prepare(
        "prompts", feedback_pb2.LogPromptRequest(request_id="r1", text="hello", user_id="mallory"), user, LIMITS
    )
    assert prompt.event.user_id == "alice"
    assert prompt.event.event_id == prompt.event.prompt_id == event_id_for("alice", "r1")
    demo = prepare(
        "demonstrations",
        feedback_pb2.SubmitDemonstrationRequest(
            request_id="r1", prompt_id=prompt.event_id, response="hi", labeler_id="mallory"
        ),
        LABELER,
        LIMITS,
    )
    assert demo.event.labeler_id == "lab1" and demo.event.user_id == ""  # the builder joins the prompt's author
    assert demo.event_id != prompt.event_id  # another caller, another event id
    # a forged id does not change the fingerprint: a retry that only differs there is the same request
    forged = prepare(
        "prompts", feedback_pb2.LogPromptRequest(request_id="r1", text="hello", user_id="eve"), user, LIMITS
    )
    assert forged.fingerprint == prompt.fingerprint and forged.event_id == prompt.event_id


def test_labeler_written_prompt_is_attributed_to_the_labeler():
    demo = prepare(
        "demonstrations",
        feedback_pb2.SubmitDemonstrationRequest(request_id="r", prompt_text="Write a poem", response="..."),
        LABELER,
        LIMITS,
    )
    assert demo.event.user_id == "lab1" and demo.event.prompt_id.startswith("lp-")


def test_locate_bad_utf8_names_the_nested_field():
    request = comparison(("good", 1), ("BAD", 2))
    raw = request.SerializeToString().replace(b"BAD", b"\xff\xfe\xfd")
    assert locate_bad_utf8(raw, feedback_pb2.SubmitComparisonRequest.DESCRIPTOR) == "responses[1].text"
    assert locate_bad_utf8(request.SerializeToString(), feedback_pb2.SubmitComparisonRequest.DESCRIPTOR) is None


def test_idempotency_cache_has_one_owner_per_key_and_forgets_failures():
    cache = IdempotencyCache(capacity=2)
    owners = []
    barrier = threading.Barrier(8)

    def race():
        barrier.wait()
        owners.append(cache.reserve("k", "fp")[1])

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert owners.count(True) == 1
    entry, _ = cache.reserve("k", "fp")
    cache.complete("k", entry, feedback_pb2.SubmitReply(event_id="ev-1", offset=7))
    assert cache.reserve("k", "fp")[0].wait(1) == feedback_pb2.SubmitReply(event_id="ev-1", offset=7, duplicate=True)

    failing, owner = cache.reserve("f", "fp")
    cache.fail("f", failing, RuntimeError("broker down"))
    with pytest.raises(RuntimeError):
        failing.wait(1)
    assert cache.reserve("f", "fp")[1] is True  # a retry after a failure publishes again

    in_flight, _ = cache.reserve("slow", "fp")
    for key in ("a", "b", "c"):
        e, _ = cache.reserve(key, "fp")
        cache.complete(key, e, feedback_pb2.SubmitReply(event_id=key))
    assert cache.reserve("slow", "fp") == (in_flight, False)  # in-flight entries are never evicted
    assert cache.reserve("a", "fp")[1] is True  # the oldest completed one was
    assert len(cache) == 5  # 2 completed (the capacity) + 3 in flight ("f", "slow", "a")
