"""Kafka helpers: topic names, protobuf event encoding, producers, consumers,
and the checkpoint-announcement follower that serving services use.

Every topic carries one protobuf message type (see protos/rlhf/v1/events.proto).
Records are keyed by user id so one user's events stay in order; the headers
name the schema so other clients can decode them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from google.protobuf.message import DecodeError, Message
from rlhf.v1 import events_pb2

from services.common.config import Settings
from services.common.feedback import KINDS as FEEDBACK_KINDS
from services.common.logs import get_logger, log_fields

log = get_logger(__name__)

# topic key -> event message type: one topic per feedback kind, then the platform's own
TOPIC_TYPES: dict[str, type[Message]] = {
    **{key: kind.event_type for key, kind in FEEDBACK_KINDS.items()},
    "checkpoints": events_pb2.CheckpointEvent,
    "deadletter": events_pb2.DeadLetterEvent,
}
SCHEMA_VERSION = "v1"


@dataclass(frozen=True)
class Topics:
    prefix: str

    def name(self, key: str) -> str:
        if key not in TOPIC_TYPES:
            raise KeyError(f"unknown topic key {key!r}")
        return f"{self.prefix}.{key}.{SCHEMA_VERSION}"

    def all(self) -> dict[str, str]:
        return {key: self.name(key) for key in TOPIC_TYPES}

    def key_of(self, topic: str) -> str:
        for key, name in self.all().items():
            if name == topic:
                return key
        raise KeyError(f"{topic!r} is not one of the platform's topics")

    @classmethod
    def from_settings(cls, settings: Settings) -> Topics:
        return cls(settings.topic_prefix)


def headers_for(message: Message) -> list[tuple[str, bytes]]:
    return [
        ("content-type", b"application/x-protobuf"),
        ("schema", message.DESCRIPTOR.full_name.encode()),
    ]


def decode(topic_key: str, value: bytes) -> Message:
    """Decode a record value of a topic; raise DecodeError on garbage."""
    msg = TOPIC_TYPES[topic_key]()
    msg.ParseFromString(value)
    return msg


def create_topics(settings: Settings, keys: Iterable[str] | None = None, timeout: float = 30.0) -> list[str]:
    """Create the platform's topics if they are missing (idempotent)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    topics = Topics.from_settings(settings)
    names = [topics.name(k) for k in (keys or TOPIC_TYPES)]
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=int(timeout * 1000))
    try:
        existing = set(admin.list_topics())
        # Replicated topics also say how many replicas an acks=all write needs.
        configs = (
            {"min.insync.replicas": str(settings.topic_min_insync_replicas)} if settings.topic_replication > 1 else {}
        )
        wanted = [
            NewTopic(
                name,
                num_partitions=settings.topic_partitions,
                replication_factor=settings.topic_replication,
                topic_configs=configs,
            )
            for name in names
            if name not in existing
        ]
        if wanted:
            try:
                admin.create_topics(wanted)
            except TopicAlreadyExistsError:
                pass
        log_fields(log, logging.INFO, "topics ready", topics=names, created=[t.name for t in wanted])
    finally:
        admin.close()
    return names


def make_producer(settings: Settings, **overrides):
    """An idempotent producer with acks=all: a write is acknowledged only once durable."""
    from kafka import KafkaProducer

    options = dict(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        enable_idempotence=True,
        retries=5,
        linger_ms=1,
        max_in_flight_requests_per_connection=5,
        request_timeout_ms=int(settings.kafka_timeout_s * 1000),
        max_block_ms=int(settings.kafka_timeout_s * 1000),
        # Only the platform creates topics (create_topics, with the configured
        # partitions): a client that auto-created one after a broker restart
        # would get the broker's default partition count, which moves keys.
        allow_auto_create_topics=False,
    )
    options.update(overrides)
    # Drop a record about when its caller gives up on it (the shortest kafka-python
    # accepts), so a write reported as failed is rarely delivered much later.
    options.setdefault("delivery_timeout_ms", options["request_timeout_ms"] + options["linger_ms"])
    return KafkaProducer(**options)


def make_consumer(settings: Settings, group_id: str | None, **overrides):
    """A consumer of raw bytes; manual commits when it belongs to a group."""
    from kafka import KafkaConsumer

    options = dict(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        consumer_timeout_ms=float("inf"),
        session_timeout_ms=10000,
        heartbeat_interval_ms=1000,
        max_poll_interval_ms=300000,
        allow_auto_create_topics=False,  # see make_producer
    )
    options.update(overrides)
    return KafkaConsumer(**options)


def publish(producer, topics: Topics, key: str, record_key: str, message: Message, timeout: float):
    """Send one event and wait for the broker's acknowledgement; return RecordMetadata."""
    raw_key = record_key.encode() if isinstance(record_key, str) else record_key
    future = producer.send(
        topics.name(key), key=raw_key, value=message.SerializeToString(), headers=headers_for(message)
    )
    return future.get(timeout=timeout)


def announce_checkpoint(settings: Settings, event: events_pb2.CheckpointEvent, producer=None) -> None:
    """Publish a checkpoint event (created / promoted / rejected) and wait for the ack."""
    own = producer is None
    producer = producer or make_producer(settings)
    try:
        if not event.created_unix_ms:
            event.created_unix_ms = int(time.time() * 1000)
        publish(
            producer,
            Topics.from_settings(settings),
            "checkpoints",
            event.role or event.version,
            event,
            settings.kafka_timeout_s,
        )
        log_fields(
            log,
            logging.INFO,
            "checkpoint announced",
            version=event.version,
            type=events_pb2.CheckpointEvent.Type.Name(event.type),
            role=event.role,
        )
    finally:
        if own:
            producer.close()


class CheckpointFollower:
    """Follows the checkpoints topic in a background thread and calls
    `on_event(event)` for every CheckpointEvent of one role.

    It reads without a consumer group (every replica must see every event),
    from the end of the topic by default, and reconnects if the broker goes
    away.
    """

    def __init__(
        self,
        settings: Settings,
        role: str,
        on_event: Callable[[events_pb2.CheckpointEvent], None],
        from_beginning: bool = False,
    ):
        self.settings = settings
        self.role = role
        self.on_event = on_event
        self.from_beginning = from_beginning
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ckpt-follow-{role}", daemon=True)

    def start(self, wait: float = 15.0) -> CheckpointFollower:
        self._thread.start()
        self._ready.wait(wait)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def _run(self) -> None:
        from kafka import TopicPartition
        from kafka.errors import KafkaError

        topic = Topics.from_settings(self.settings).name("checkpoints")
        positions: dict[int, int] = {}
        while not self._stop.is_set():
            consumer = None
            try:
                consumer = make_consumer(self.settings, None, request_timeout_ms=5000)
                partitions = consumer.partitions_for_topic(topic)
                if not partitions:
                    create_topics(self.settings, ["checkpoints"])
                    partitions = consumer.partitions_for_topic(topic) or set()
                    if not partitions:
                        raise KafkaError(f"topic {topic} has no partitions yet")
                tps = [TopicPartition(topic, p) for p in sorted(partitions)]
                consumer.assign(tps)
                for tp in tps:
                    if tp.partition in positions:
                        consumer.seek(tp, positions[tp.partition])
                    elif self.from_beginning:
                        consumer.seek_to_beginning(tp)
                    else:
                        consumer.seek_to_end(tp)
                for tp in tps:
                    positions[tp.partition] = consumer.position(tp)
                self._ready.set()
                while not self._stop.is_set():
                    batch = consumer.poll(timeout_ms=500)
                    for tp, records in batch.items():
                        for record in records:
                            positions[tp.partition] = record.offset + 1
                            self._handle(record.value)
            except KafkaError as err:
                log_fields(
                    log,
                    logging.WARNING,
                    "checkpoint follower lost the broker; retrying",
                    error=str(err),
                    role=self.role,
                )
                self._stop.wait(2.0)
            except Exception as err:  # a bug in on_event must not kill the follower
                log.exception("checkpoint follower error", extra={"fields": {"error": str(err)}})
                self._stop.wait(1.0)
            finally:
                if consumer is not None:
                    consumer.close()

    def _handle(self, value: bytes) -> None:
        try:
            event = decode("checkpoints", value)
        except DecodeError as err:
            log_fields(log, logging.WARNING, "undecodable checkpoint event skipped", error=str(err))
            return
        if event.role == self.role:
            self.on_event(event)


def promote_checkpoint(settings: Settings, version: str, reason: str, producer=None) -> events_pb2.CheckpointEvent:
    """Record `version` as the promoted checkpoint of its role and announce it.

    The pointer file lets a restarted service find it even if the broker lost
    its data; the PROMOTED event makes running services swap to it.
    """
    from services.common.checkpoints import CheckpointStore

    store = CheckpointStore(settings.checkpoint_dir)
    manifest = store.verify(version)
    store.set_promoted(manifest.role, version, reason=reason)
    event = checkpoint_event(settings, version, events_pb2.CheckpointEvent.TYPE_PROMOTED, reason)
    announce_checkpoint(settings, event, producer)
    return event


def checkpoint_event(settings: Settings, version: str, type_: int, reason: str = "") -> events_pb2.CheckpointEvent:
    """Build a checkpoint event (created, promoted or rejected) describing a stored checkpoint."""
    from services.common.checkpoints import CheckpointStore

    store = CheckpointStore(settings.checkpoint_dir)
    manifest = store.manifest(version)
    return events_pb2.CheckpointEvent(
        type=type_,
        version=version,
        kind=manifest.kind,
        role=manifest.role,
        path=str(store.path(version)),
        manifest_sha256=store.manifest_sha256(version),
        parents=manifest.parents,
        dataset_snapshot=manifest.dataset_snapshot,
        reason=reason,
    )


def topic_records(settings: Settings, key: str, timeout: float = 30.0) -> list:
    """Every record on one of the platform's topics so far (raw ConsumerRecords,
    oldest first per partition).

    Reads without a consumer group (assign + seek to the beginning) up to the
    end offsets seen at the start, so it returns promptly.
    """
    from kafka import TopicPartition

    topic = Topics.from_settings(settings).name(key)
    consumer = make_consumer(settings, None)
    try:
        deadline = time.monotonic() + timeout
        partitions = consumer.partitions_for_topic(topic)
        while not partitions and time.monotonic() < deadline:
            time.sleep(0.2)  # metadata for a just-created topic
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        out = []
        while any(consumer.position(tp) < end[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"read {len(out)} records from {topic} but the end offsets {end} were not reached in {timeout:.0f}s"
                )
            for records in consumer.poll(timeout_ms=500).values():
                out += records
        return out
    finally:
        consumer.close()


def read_topic(settings: Settings, key: str, timeout: float = 30.0) -> list[Message]:
    """Every event on one of the platform's topics so far, decoded."""
    return [decode(key, record.value) for record in topic_records(settings, key, timeout)]
