"""FeedbackService against a real Tansu broker and a real gRPC server:
auth, validation, idempotency, bulk import and a broker outage."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rlhf.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc

from services.common import bus
from services.common.auth import bearer
from services.common.broker import free_port, start_broker, stop_process
from services.common.config import to_env
from services.common.grpc_server import wait_for_serving
from services.feedback import VALIDATE_FIRST
from services.feedback.server import start
from tests.conftest import make_settings

TOKENS = "tok-alice=alice:user,tok-bob=bob:user,tok-lab=lab1:labeler"


def read_topic(settings, key: str) -> list[tuple[bytes, object]]:
    """Every record of a topic as (record key, decoded event)."""
    return [(r.key, bus.decode(key, r.value)) for r in bus.topic_records(settings, key, timeout=20)]


@pytest.fixture(scope="module")
def service(broker, tmp_path_factory):
    settings = make_settings(
        tmp_path_factory.mktemp("feedback"), broker, RLHF_TOKENS=TOKENS, RLHF_FEEDBACK_MAX_TEXT_BYTES="2000"
    )
    handle = start(settings)
    channel = grpc.insecure_channel(f"127.0.0.1:{handle.port}")
    yield settings, feedback_pb2_grpc.FeedbackServiceStub(channel), channel
    channel.close()
    handle.stop()


def ranked(*texts: str) -> list[events_pb2.RankedResponse]:
    return [events_pb2.RankedResponse(text=t, policy_version="base-1", rank=i + 1) for i, t in enumerate(texts)]


def test_prompt_is_recorded_under_the_tokens_user_and_forged_ids_are_ignored(service):
    settings, stub, _ = service
    reply = stub.LogPrompt(
        feedback_pb2.LogPromptRequest(request_id="p-1", text="Hello there", user_id="mallory", source="api"),
        metadata=bearer("tok-alice"),
        timeout=10,
    )
    assert (
        reply.event_id.startswith("ev-")
        and not reply.duplicate
        and reply.topic == bus.Topics.from_settings(settings).name("prompts")
    )
    demo = stub.SubmitDemonstration(
        feedback_pb2.SubmitDemonstrationRequest(
            request_id="d-1", prompt_id=reply.event_id, response="General Kenobi", labeler_id="mallory"
        ),
        metadata=bearer("tok-lab"),
        timeout=10,
    )
    ((key, prompt),) = [(k, e) for k, e in read_topic(settings, "prompts") if e.event_id == reply.event_id]
    assert (
        prompt.user_id == "alice"
        and key == b"alice"
        and prompt.prompt_id == reply.event_id
        and prompt.text == "Hello there"
    )
    ((key, event),) = [(k, e) for k, e in read_topic(settings, "demonstrations") if e.event_id == demo.event_id]
    assert event.labeler_id == "lab1" and key == b"lab1" and event.prompt_id == reply.event_id


def test_retry_with_the_same_request_id_leaves_one_record(service):
    settings, stub, _ = service
    request = feedback_pb2.SubmitComparisonRequest(
        request_id="cmp-retry", prompt_text="Pick one", responses=ranked("a", "b", "c", "d")
    )
    replies: list = []

    def submit():
        replies.append(stub.SubmitComparison(request, metadata=bearer("tok-lab"), timeout=10))

    threads = [threading.Thread(target=submit) for _ in range(6)]  # concurrent retries
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    replies.append(stub.SubmitComparison(request, metadata=bearer("tok-lab"), timeout=10))  # a later retry
    assert len({r.event_id for r in replies}) == 1
    assert sum(not r.duplicate for r in replies) == 1
    assert len({(r.partition, r.offset) for r in replies}) == 1
    assert [e.event_id for _, e in read_topic(settings, "comparisons")].count(replies[0].event_id) == 1
    # The same request id with another payload is refused, not silently merged.
    other = feedback_pb2.SubmitComparisonRequest(
        request_id="cmp-retry", prompt_text="Pick one", responses=ranked("a", "b")
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitComparison(other, metadata=bearer("tok-lab"), timeout=10)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and "request_id" in err.value.details()


def test_a_retry_after_a_client_deadline_gets_the_first_calls_reply_within_the_broker_timeout(broker, tmp_path):
    """Calls cut off by their deadline (1 ms, and 300 ms while the broker is
    frozen, so the record is surely on its way): the retry with the same
    request id returns the first write's reply once the broker acknowledges it,
    never UNAVAILABLE for a healthy broker, and each request lands once."""
    port = free_port()
    proc = start_broker(port, log_path=tmp_path / "tansu.log")
    settings = make_settings(tmp_path / "home", f"127.0.0.1:{port}", RLHF_TOKENS=TOKENS)
    handle = start(settings)
    channel = grpc.insecure_channel(f"127.0.0.1:{handle.port}")
    stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
    requests = {
        deadline: feedback_pb2.SubmitComparisonRequest(
            request_id=f"cmp-deadline-{deadline}", prompt_text="Pick one", responses=ranked("a", "b", "c", "d")
        )
        for deadline in (0.001, 0.3)
    }
    try:
        stub.SubmitComparison(  # warm: connections and metadata
            feedback_pb2.SubmitComparisonRequest(request_id="warm", prompt_text="p", responses=ranked("a", "b")),
            metadata=bearer("tok-lab"),
            timeout=10,
        )
        proc.send_signal(signal.SIGSTOP)  # the broker stalls: the records wait for their acks
        for deadline, request in requests.items():
            with pytest.raises(grpc.RpcError) as err:
                stub.SubmitComparison(request, metadata=bearer("tok-lab"), timeout=deadline)
            # the client's deadline, or the service's UNAVAILABLE just before it
            assert err.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        proc.send_signal(signal.SIGCONT)
        replies = {}
        for deadline, request in requests.items():
            started = time.monotonic()
            replies[deadline] = stub.SubmitComparison(request, metadata=bearer("tok-lab"), timeout=30)
            assert time.monotonic() - started < settings.kafka_timeout_s
        assert replies[0.3].duplicate  # the first call's record landed: its reply, not a second write
        for deadline, request in requests.items():
            again = stub.SubmitComparison(request, metadata=bearer("tok-lab"), timeout=10)
            assert again.duplicate and (again.event_id, again.offset) == (
                replies[deadline].event_id,
                replies[deadline].offset,
            )
        events = [e.request_id for _, e in read_topic(settings, "comparisons")]
        assert all(events.count(r.request_id) == 1 for r in requests.values()), events
        assert handle.servicer.cache.in_flight == 0  # every entry settled: none left behind
    finally:
        proc.send_signal(signal.SIGCONT)
        channel.close()
        handle.stop()
        stop_process(proc)


def test_bad_token_and_wrong_role_are_refused_and_nothing_is_written(service):
    settings, stub, _ = service
    before = len(read_topic(settings, "prompts")), len(read_topic(settings, "labels"))
    prompt = feedback_pb2.LogPromptRequest(request_id="auth-1", text="hi")
    for metadata, code in [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        (bearer("nope"), grpc.StatusCode.UNAUTHENTICATED),
        ([("authorization", "Basic abc")], grpc.StatusCode.UNAUTHENTICATED),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            stub.LogPrompt(prompt, metadata=metadata, timeout=10)
        assert err.value.code() == code
    labels = feedback_pb2.SubmitLabelsRequest(
        request_id="l", prompt_text="p", response="r", policy_version="v", likert=5
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitLabels(labels, metadata=bearer("tok-bob"), timeout=10)  # a user is not a labeler
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        list(stub.BulkSubmit(iter([feedback_pb2.BulkItem(labels=labels)]), metadata=bearer("tok-bob"), timeout=10))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "items[0].labels" in err.value.details()
    assert (len(read_topic(settings, "prompts")), len(read_topic(settings, "labels"))) == before


def test_invalid_requests_name_the_field_and_write_nothing(service):
    settings, stub, channel = service
    before = len(read_topic(settings, "comparisons"))
    cases = [
        (
            feedback_pb2.SubmitComparisonRequest(request_id="v1", prompt_text="p", responses=ranked("a", "a")),
            "responses[1].text",
        ),
        (
            feedback_pb2.SubmitComparisonRequest(request_id="v2", prompt_text="p", responses=ranked(*"abcdefghij")),
            "K must be between 2 and 9",
        ),
        (
            feedback_pb2.SubmitComparisonRequest(request_id="v3", prompt_text="p", responses=ranked("a", "x" * 2001)),
            "the limit is 2000",
        ),
    ]
    for request, expected in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.SubmitComparison(request, metadata=bearer("tok-lab"), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in err.value.details()
    # Text that is not UTF-8 cannot even be built with the generated classes: send raw bytes.
    raw = feedback_pb2.SubmitComparisonRequest(
        request_id="v4", prompt_text="p", responses=ranked("ok", "BAD")
    ).SerializeToString()
    call = channel.unary_unary("/rlhf.v1.FeedbackService/SubmitComparison")
    with pytest.raises(grpc.RpcError) as err:
        call(raw.replace(b"BAD", b"\xc3\x28\xff"), metadata=bearer("tok-lab"), timeout=10)
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and err.value.details() == "responses[1].text: is not valid UTF-8"
    )
    assert len(read_topic(settings, "comparisons")) == before


def test_bulk_submit_acknowledges_in_order_and_stops_at_the_first_bad_item(service):
    settings, stub, _ = service
    items = [
        feedback_pb2.BulkItem(prompt=feedback_pb2.LogPromptRequest(request_id=f"bulk-{i}", text=f"bulk prompt {i}"))
        for i in range(50)
    ]
    items.append(
        feedback_pb2.BulkItem(
            comparison=feedback_pb2.SubmitComparisonRequest(
                request_id="bulk-c", prompt_text="p", responses=ranked("a", "b")
            )
        )
    )
    items.append(items[3])  # a retry inside the stream
    replies = list(stub.BulkSubmit(iter(items), metadata=bearer("tok-lab"), timeout=30))
    assert len(replies) == len(items)
    assert replies[-1].duplicate and replies[-1].event_id == replies[3].event_id
    offsets = [r.offset for r in replies[:50]]
    assert offsets == sorted(offsets)  # one user, one partition, in order
    written = {e.event_id for _, e in read_topic(settings, "prompts")}
    assert {r.event_id for r in replies[:50]} <= written

    bad = [
        items[0],
        feedback_pb2.BulkItem(prompt=feedback_pb2.LogPromptRequest(request_id="bulk-new", text="fine")),
        feedback_pb2.BulkItem(
            comparison=feedback_pb2.SubmitComparisonRequest(request_id="x", prompt_text="p", responses=ranked("a"))
        ),
        feedback_pb2.BulkItem(prompt=feedback_pb2.LogPromptRequest(request_id="bulk-never", text="never")),
    ]
    got = []
    with pytest.raises(grpc.RpcError) as err:
        for reply in stub.BulkSubmit(iter(bad), metadata=bearer("tok-lab"), timeout=30):
            got.append(reply)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("items[2].comparison.responses: has 1 responses")
    assert (
        len(got) == 2 and got[0].duplicate and not got[1].duplicate
    )  # everything before the bad item was acknowledged
    texts = [e.text for _, e in read_topic(settings, "prompts")]
    assert "fine" in texts and "never" not in texts


def test_a_validate_first_stream_writes_all_items_or_none(service):
    settings, stub, _ = service
    metadata = [*bearer("tok-lab"), VALIDATE_FIRST]
    ranking = feedback_pb2.SubmitComparisonRequest(
        request_id="vf-cmp", prompt_text="Pick", responses=ranked("a", "b", "c", "d")
    )
    labels = feedback_pb2.SubmitLabelsRequest(
        request_id="vf-lab", prompt_text="Pick", response="a", policy_version="base-1", likert=9
    )
    demo = feedback_pb2.SubmitDemonstrationRequest(request_id="vf-demo", prompt_text="Pick", response="a, clearly")
    items = [
        feedback_pb2.BulkItem(comparison=ranking),
        feedback_pb2.BulkItem(labels=labels),
        feedback_pb2.BulkItem(demonstration=demo),
    ]
    with pytest.raises(
        grpc.RpcError
    ) as err:  # the labels' Likert is out of range: the good ranking before it is not written either
        list(stub.BulkSubmit(iter(items), metadata=metadata, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(
        "items[1].labels.likert"
    )
    written = {
        e.request_id for kind in ("comparisons", "labels", "demonstrations") for _, e in read_topic(settings, kind)
    }
    assert not written & {"vf-cmp", "vf-lab", "vf-demo"}

    labels.likert = 6
    items[1] = feedback_pb2.BulkItem(labels=labels)
    replies = list(stub.BulkSubmit(iter(items), metadata=metadata, timeout=30))
    assert [r.topic.split(".")[-2] for r in replies] == ["comparisons", "labels", "demonstrations"]
    assert all(
        list(stub.BulkSubmit(iter(items), metadata=metadata, timeout=30))[i].duplicate for i in range(3)
    )  # a resubmission writes nothing

    too_many = [
        feedback_pb2.BulkItem(prompt=feedback_pb2.LogPromptRequest(request_id=f"vf-{i}", text="x")) for i in range(9)
    ]
    small = start(settings.with_overrides(feedback_bulk_window=8))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{small.port}") as channel, pytest.raises(grpc.RpcError) as err:
            list(
                feedback_pb2_grpc.FeedbackServiceStub(channel).BulkSubmit(iter(too_many), metadata=metadata, timeout=30)
            )
        assert (
            err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            and "at most 8 items (RLHF_FEEDBACK_BULK_WINDOW)" in err.value.details()
        )
    finally:
        small.stop()


def test_calls_beyond_the_limit_get_resource_exhausted_and_health_still_answers(broker, tmp_path):
    settings = make_settings(tmp_path, broker, RLHF_TOKENS=TOKENS, RLHF_FEEDBACK_MAX_CALLS="1")
    handle = start(settings)
    channel = grpc.insecure_channel(f"127.0.0.1:{handle.port}")
    stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
    release = threading.Event()

    def slow_items():  # a bulk import that holds its stream open
        yield feedback_pb2.BulkItem(prompt=feedback_pb2.LogPromptRequest(request_id="held-1", text="first"))
        release.wait(20)
        yield feedback_pb2.BulkItem(prompt=feedback_pb2.LogPromptRequest(request_id="held-2", text="second"))

    try:
        stream = stub.BulkSubmit(slow_items(), metadata=bearer("tok-alice"), timeout=30)
        first = next(stream)  # the stream is in progress: it holds the one slot
        request = feedback_pb2.LogPromptRequest(request_id="over", text="one too many")
        with pytest.raises(grpc.RpcError) as err:
            stub.LogPrompt(request, metadata=bearer("tok-bob"), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "RLHF_FEEDBACK_MAX_CALLS=1" in err.value.details()
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes are not refused under load

        release.set()
        assert [r.duplicate for r in [first, *stream]] == [False, False]
        assert not stub.LogPrompt(
            request, metadata=bearer("tok-bob"), timeout=10
        ).duplicate  # refused earlier: nothing was written then
        assert sorted(e.request_id for _, e in read_topic(settings, "prompts")) == ["held-1", "held-2", "over"]
    finally:
        release.set()
        channel.close()
        handle.stop()


@pytest.mark.parametrize("client", ["librdkafka", "kafka-python"])
def test_broker_down_gives_unavailable_within_the_deadline_and_the_service_recovers(tmp_path, client):
    port = free_port()
    proc = start_broker(port, log_path=tmp_path / "tansu.log")
    settings = make_settings(
        tmp_path / "home",
        f"127.0.0.1:{port}",
        RLHF_TOKENS=TOKENS,
        RLHF_KAFKA_TIMEOUT_S="2",
        RLHF_FEEDBACK_PRODUCER=client,
    )
    handle = start(settings)
    channel = grpc.insecure_channel(f"127.0.0.1:{handle.port}")
    stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
    try:
        ok = stub.LogPrompt(
            feedback_pb2.LogPromptRequest(request_id="up", text="while up"), metadata=bearer("tok-alice"), timeout=10
        )
        assert [e.event_id for _, e in read_topic(settings, "prompts")] == [ok.event_id]  # acknowledged = readable
        proc.kill()  # the broker crashes (SIGTERM would first wait for clients to go)
        proc.wait()

        request = feedback_pb2.LogPromptRequest(request_id="down", text="while down")
        for _ in range(2):  # the retry is not answered from the cache: the first was never acknowledged
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                stub.LogPrompt(request, metadata=bearer("tok-alice"), timeout=8)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
            assert time.monotonic() - started < 4
        with pytest.raises(grpc.RpcError) as err:
            list(
                stub.BulkSubmit(iter([feedback_pb2.BulkItem(prompt=request)]), metadata=bearer("tok-alice"), timeout=8)
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # A deadline shorter than the broker timeout is honoured too.
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.LogPrompt(
                feedback_pb2.LogPromptRequest(request_id="short", text="x"), metadata=bearer("tok-alice"), timeout=0.8
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started < 1.0

        # The broker comes back without its state (Tansu keeps it in memory):
        # the old producer id is unknown there, which stops an idempotent
        # producer for good. The service replaces its client, and the
        # client's retries of the same request go through, written once.
        proc = start_broker(port, log_path=tmp_path / "tansu.log")
        bus.create_topics(settings)
        replies, deadline = [], time.monotonic() + 30
        while len(replies) < 2 and time.monotonic() < deadline:
            try:
                replies.append(stub.LogPrompt(request, metadata=bearer("tok-alice"), timeout=8))
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                time.sleep(0.2)
        assert len(replies) == 2, "the service did not recover after the broker came back"
        assert not replies[0].duplicate and replies[1].duplicate and replies[1].event_id == replies[0].event_id
        assert [e.request_id for _, e in read_topic(settings, "prompts")] == ["down"]
        assert handle.servicer.producer.replacements == 1
    finally:
        channel.close()
        handle.stop()
        stop_process(proc)


def test_sigterm_lets_calls_in_flight_finish_and_refuses_new_ones(broker, tmp_path):
    """`python -m services.feedback` as the stack and Kubernetes run it: on SIGTERM
    a bulk import already streaming completes within RLHF_GRPC_GRACE_S, a new
    call is refused, and the process exits 0."""
    port = free_port()
    settings = make_settings(tmp_path, broker, RLHF_TOKENS=TOKENS, RLHF_FEEDBACK_PORT=str(port), RLHF_GRPC_GRACE_S="10")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")} | to_env(settings)
    log = open(tmp_path / "feedback.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.feedback"], env=env, stdout=log, stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    try:
        wait_for_serving(target, timeout=60, while_alive=proc)
        items: queue.Queue = queue.Queue()
        with grpc.insecure_channel(target) as channel:
            stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
            stream = stub.BulkSubmit(iter(items.get, None), metadata=bearer("tok-alice"), timeout=30)
            items.put(
                feedback_pb2.BulkItem(prompt=feedback_pb2.LogPromptRequest(request_id="drain-1", text="before SIGTERM"))
            )
            first = next(stream)

            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            refused = None
            with grpc.insecure_channel(target) as fresh:  # a new connection, as a new client would open
                while refused is None and time.monotonic() < deadline:
                    try:
                        feedback_pb2_grpc.FeedbackServiceStub(fresh).LogPrompt(
                            feedback_pb2.LogPromptRequest(request_id=f"late-{time.monotonic()}", text="after SIGTERM"),
                            metadata=bearer("tok-alice"),
                            timeout=2,
                        )
                        time.sleep(0.05)  # the signal may not have landed yet
                    except grpc.RpcError as err:
                        refused = err.code()
            assert refused == grpc.StatusCode.UNAVAILABLE

            items.put(
                feedback_pb2.BulkItem(
                    prompt=feedback_pb2.LogPromptRequest(request_id="drain-2", text="during the drain")
                )
            )
            items.put(None)  # the client ends its stream
            rest = list(stream)
        assert len(rest) == 1 and proc.wait(timeout=20) == 0
        texts = [e.text for _, e in read_topic(settings, "prompts")]
        assert {"before SIGTERM", "during the drain"} <= set(texts) and first.event_id != rest[0].event_id
    finally:
        stop_process(proc)
