"""The embedded broker is a real Kafka-protocol broker: kafka-python and
librdkafka (confluent-kafka) both produce and consume our protobuf events, and
a consumer group resumes from its committed offset."""

import time
import uuid

from confluent_kafka import Consumer as RdConsumer
from rlhf.v1 import events_pb2

from services.common import bus


def _poll_until(consumer, want: int, timeout: float = 45.0) -> list:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            got.extend(records)
    return got


def test_produce_consume_and_group_resume_from_committed_offset(settings):
    bus.create_topics(settings, ["prompts"])
    topics = bus.Topics.from_settings(settings)
    producer = bus.make_producer(settings)
    for i in range(10):
        bus.publish(
            producer,
            topics,
            "prompts",
            "user-1",
            events_pb2.PromptEvent(event_id=f"e{i}", user_id="user-1", text=f"p{i}"),
            10,
        )
    producer.close()

    group = f"g-{uuid.uuid4().hex[:6]}"
    first = bus.make_consumer(settings, group, max_poll_records=4)
    first.subscribe([topics.name("prompts")])
    batch = _poll_until(first, 4)
    assert len(batch) >= 4
    seen = [bus.decode("prompts", r.value).event_id for r in batch[:4]]
    assert seen == ["e0", "e1", "e2", "e3"]  # one key -> one partition -> in order
    # Commit exactly what was processed, then leave the group.
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    last = batch[3]
    first.commit({TopicPartition(last.topic, last.partition): OffsetAndMetadata(last.offset + 1, "", -1)})
    first.close()

    second = bus.make_consumer(settings, group)
    second.subscribe([topics.name("prompts")])
    rest = _poll_until(second, 6)
    second.close()
    assert [bus.decode("prompts", r.value).event_id for r in rest] == [f"e{i}" for i in range(4, 10)]


def test_events_are_readable_by_librdkafka(settings):
    bus.create_topics(settings, ["comparisons"])
    topics = bus.Topics.from_settings(settings)
    producer = bus.make_producer(settings)
    event = events_pb2.ComparisonEvent(
        event_id="c1",
        user_id="u",
        prompt_text="Say hi",
        responses=[events_pb2.RankedResponse(text="hi", rank=1), events_pb2.RankedResponse(text="hello there", rank=2)],
    )
    bus.publish(producer, topics, "comparisons", "u", event, 10)
    producer.close()

    consumer = RdConsumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"rd-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topics.name("comparisons")])
    deadline, msg = time.monotonic() + 45, None
    while time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is None:
            break
    consumer.close()
    assert msg is not None and msg.error() is None
    assert dict(msg.headers())["schema"] == b"rlhf.v1.ComparisonEvent"
    decoded = events_pb2.ComparisonEvent.FromString(msg.value())
    assert decoded == event
