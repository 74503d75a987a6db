"""The durable embedded broker: Tansu on services.common.objectstore.

Records acknowledged with acks=all survive a SIGKILL of the broker and of
its object store, and a restarted broker appends after them instead of
writing over them (what an S3 server that ignores conditional writes lets
happen); an independent client (librdkafka) reads them back.
"""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from services.common.broker import free_port, start_broker, start_object_store, stop_process


def put(url: str, data: bytes, **headers: str) -> int:
    request = urllib.request.Request(url, data=data, method="PUT", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture
def durable(tmp_path):
    """start() -> bootstrap; kill() SIGKILLs broker and store; both on the same ports and folder."""
    store_port, kafka_port = free_port(), free_port()
    procs: list = []

    class Durable:
        bootstrap = f"127.0.0.1:{kafka_port}"
        endpoint = f"http://127.0.0.1:{store_port}"

        def start(self) -> None:
            procs.append(start_object_store(store_port, tmp_path / "data", tmp_path / "store.log"))
            procs.append(start_broker(kafka_port, tmp_path / "tansu.log", s3_endpoint=self.endpoint))

        def kill(self) -> None:
            while procs:
                proc = procs.pop()
                proc.send_signal(signal.SIGKILL)
                proc.wait()

    durable = Durable()
    yield durable
    durable.kill()  # a test broker: no need to wait for its clients to leave


def test_the_object_store_refuses_writes_whose_precondition_fails(tmp_path):
    proc = start_object_store(port := free_port(), tmp_path / "objects")
    try:
        url = f"http://127.0.0.1:{port}/tansu/a/watermark.json"
        assert put(url, b"1", **{"If-None-Match": "*"}) == 200
        assert put(url, b"2", **{"If-None-Match": "*"}) == 412  # exists already
        assert put(url, b"3", **{"If-Match": '"not-the-etag"'}) == 412  # someone else wrote in between
        with urllib.request.urlopen(url, timeout=5) as response:
            etag, body = response.headers["ETag"], response.read()
        assert body == b"1"
        assert put(url, b"4", **{"If-Match": etag}) == 200
    finally:
        stop_process(proc)


def test_acknowledged_records_survive_a_sigkill_and_new_ones_append_after_them(durable):
    from confluent_kafka import OFFSET_BEGINNING, Consumer
    from confluent_kafka import TopicPartition as KafkaPartition

    durable.start()
    admin = KafkaAdminClient(bootstrap_servers=durable.bootstrap)
    admin.create_topics([NewTopic("events", num_partitions=2, replication_factor=1)])
    admin.close()

    def produce(values: list[bytes]) -> list[tuple[int, int]]:
        producer = KafkaProducer(
            bootstrap_servers=durable.bootstrap, acks="all", enable_idempotence=True, allow_auto_create_topics=False
        )
        try:
            return [(md.partition, md.offset) for md in (producer.send("events", v).get(10) for v in values)]
        finally:
            producer.close()

    before = produce([f"before-{i}".encode() for i in range(6)])
    durable.kill()  # broker and store die together, as on a crash of the machine's processes
    durable.start()
    after = produce([f"after-{i}".encode() for i in range(4)])
    assert not set(before) & set(after), "a restarted broker wrote over acknowledged records"

    consumer = KafkaConsumer(bootstrap_servers=durable.bootstrap)
    tps = [TopicPartition("events", p) for p in range(2)]
    assert sum(consumer.end_offsets(tps).values()) == 10
    consumer.close()
    # An independent client (librdkafka) reads everything back.
    reader = Consumer({"bootstrap.servers": durable.bootstrap, "group.id": "check", "enable.auto.commit": False})
    reader.assign([KafkaPartition("events", p, OFFSET_BEGINNING) for p in range(2)])
    values: list[bytes] = []
    for _ in range(60):
        if len(values) >= 10:
            break
        values += [m.value() for m in reader.consume(10, timeout=1.0) if m.error() is None]
    reader.close()
    assert sorted(values) == sorted(
        [f"before-{i}".encode() for i in range(6)] + [f"after-{i}".encode() for i in range(4)]
    )


def test_a_checkpoint_follower_resumes_after_the_broker_restarts(durable, tmp_path):
    """Serving replicas follow the checkpoints topic: after a crash of the
    broker they see the next announcement once, and nothing twice."""
    from rlhf.v1 import events_pb2

    from services.common import bus
    from tests.conftest import make_settings

    durable.start()
    settings = make_settings(tmp_path / "home", durable.bootstrap)
    bus.create_topics(settings)
    seen: list[str] = []
    follower = bus.CheckpointFollower(settings, "policy", lambda e: seen.append(e.version)).start()
    try:
        assert follower.ready

        def announce(version: str) -> None:
            event = events_pb2.CheckpointEvent(
                type=events_pb2.CheckpointEvent.TYPE_PROMOTED, version=version, role="policy"
            )
            bus.announce_checkpoint(settings, event)

        def wait_for(n: int) -> None:
            deadline = time.monotonic() + 30
            while len(seen) < n and time.monotonic() < deadline:
                time.sleep(0.1)

        announce("ppo-1")
        wait_for(1)
        durable.kill()
        durable.start()
        announce("ppo-2")
        wait_for(2)
        time.sleep(1)  # room for a wrong replay of ppo-1
        assert seen == ["ppo-1", "ppo-2"]
    finally:
        follower.stop()


@pytest.mark.parametrize("client", ["librdkafka", "kafka-python"])
def test_the_feedback_service_writes_a_retry_once_after_the_durable_broker_restarts(durable, tmp_path, client):
    """A call that failed while the broker was down, retried after its restart:
    acknowledged within seconds, and on the topic once (the first attempt's
    record is dropped by the client, not delivered late beside the retry)."""
    import grpc
    from rlhf.v1 import feedback_pb2, feedback_pb2_grpc

    from services.common import bus
    from services.common.auth import bearer
    from services.feedback.server import start
    from tests.conftest import make_settings

    durable.start()
    settings = make_settings(
        tmp_path / "home",
        durable.bootstrap,
        RLHF_TOKENS="tok-a=alice:user",
        RLHF_FEEDBACK_PRODUCER=client,
        RLHF_KAFKA_TIMEOUT_S="2",
    )
    handle = start(settings)
    channel = grpc.insecure_channel(f"127.0.0.1:{handle.port}")
    stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
    try:
        stub.LogPrompt(feedback_pb2.LogPromptRequest(request_id="up", text="x"), metadata=bearer("tok-a"), timeout=10)
        durable.kill()
        down = feedback_pb2.LogPromptRequest(request_id="down", text="y")
        with pytest.raises(grpc.RpcError) as err:
            stub.LogPrompt(down, metadata=bearer("tok-a"), timeout=8)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        durable.start()
        restarted, reply = time.monotonic(), None
        while reply is None:
            try:
                reply = stub.LogPrompt(down, metadata=bearer("tok-a"), timeout=8)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                assert time.monotonic() - restarted < 10, err.details()
                time.sleep(0.2)
        time.sleep(2.5)  # past the broker timeout: a late copy of the first attempt would have landed
        assert [e.request_id for e in bus.read_topic(settings, "prompts")] == ["up", "down"]
    finally:
        channel.close()
        handle.stop()
