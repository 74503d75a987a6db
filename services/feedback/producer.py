"""The FeedbackService's event producer: idempotent, acks=all, one asyncio
future per record that resolves only when the broker acknowledged it.

Two clients behind one small interface (RLHF_FEEDBACK_PRODUCER):
- `librdkafka` (default): confluent-kafka. Its C client batches and does the
  network I/O off the GIL, so a record costs a few microseconds of Python
  time; the service then spends its CPU on gRPC, not on the Kafka client.
- `kafka-python`: services.common.bus.make_producer, the platform's shared
  pure-Python producer (about 10x more Python time per record).

Both partition by murmur2 of the key (the Java client's default), so one
user's events land on the same partition whichever client wrote them.

Outcomes arrive on the client's own thread and are handed to the event loop
that owns the future: librdkafka's poll thread hands over everything one
poll() returned in a single wake-up of the loop, not one per record.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from dataclasses import dataclass

from services.common import bus
from services.common.config import Settings
from services.common.logs import get_logger, log_fields

log = get_logger(__name__)


class PublishError(Exception):
    """The broker refused or did not take the record."""


@dataclass(frozen=True)
class Written:
    topic: str
    partition: int
    offset: int


Outcome = tuple[asyncio.Future, "Written | None", "Exception | None"]


def _settle(outcomes: list[Outcome]) -> None:
    """Resolve futures on their loop. A caller that stopped waiting (its
    deadline passed) has cancelled its future; a late outcome is dropped."""
    for future, written, error in outcomes:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(written)


def _hand_over(outcomes: list[Outcome]) -> None:
    """From a client thread: settle `outcomes` on their loops, one wake-up per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        by_loop[outcome[0].get_loop()].append(outcome)
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, batch)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


class LibrdkafkaProducer:
    def __init__(self, settings: Settings):
        from confluent_kafka import Producer

        self._producer = Producer({
            "bootstrap.servers": settings.kafka_bootstrap,
            "enable.idempotence": True,        # implies acks=all, bounded in-flight, retries
            "acks": "all",
            "linger.ms": 1,
            "partitioner": "murmur2_random",   # same partition per key as Java / kafka-python clients
            "socket.nagle.disable": True,      # acks are latency-bound: send small requests at once
            # Give up on a record about when its caller gives up on it, so a
            # record we reported UNAVAILABLE is rarely written much later.
            "message.timeout.ms": int(settings.kafka_timeout_s * 1000),
            "socket.timeout.ms": max(1000, int(settings.kafka_timeout_s * 1000)),
            "logger": get_logger("librdkafka"),  # its lines join our JSON logs (served by poll())
        })
        # Connect now rather than on the first call (librdkafka connects lazily).
        self._producer.list_topics(timeout=settings.kafka_timeout_s)
        self._delivered: list[Outcome] = []  # filled by delivery callbacks inside poll()
        self._stop = threading.Event()
        # Delivery callbacks run inside poll(); one thread serves them all.
        self._poller = threading.Thread(target=self._poll, name="feedback-producer-poll", daemon=True)
        self._poller.start()

    def send(self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> asyncio.Future:
        """Queue one record; call on the event loop that will await the future."""
        future = asyncio.get_running_loop().create_future()
        delivered = self._delivered

        def on_delivery(err, msg) -> None:
            if err is not None:
                delivered.append((future, None, PublishError(f"{err.name()}: {err.str()}")))
            else:
                delivered.append((future, Written(msg.topic(), msg.partition(), msg.offset()), None))

        try:
            self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
        except BufferError:
            # The local queue is full: the broker is slower than the input.
            raise PublishError("the producer's local queue is full; the broker is not keeping up") from None
        except Exception as err:  # KafkaException: e.g. a fatal idempotence error
            raise PublishError(str(err)) from None
        return future

    def close(self, timeout: float) -> None:
        self._stop.set()
        self._poller.join(timeout=2)
        left = self._producer.flush(timeout)  # serves the last callbacks on this thread
        self._dispatch()
        if left:
            log_fields(log, 30, "producer closed with unacknowledged records (their calls got UNAVAILABLE)", records=left)

    def _dispatch(self) -> None:
        if self._delivered:  # only the thread that serves poll() touches the list
            batch = self._delivered[:]
            self._delivered.clear()
            _hand_over(batch)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)
            self._dispatch()


class KafkaPythonProducer:
    def __init__(self, settings: Settings):
        self._producer = bus.make_producer(settings)

    def send(self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> asyncio.Future:
        from kafka.errors import KafkaError

        future = asyncio.get_running_loop().create_future()
        try:
            sent = self._producer.send(topic, key=key, value=value, headers=headers)
        except KafkaError as err:  # e.g. no metadata within max_block_ms: the broker is away
            raise PublishError(str(err)) from None
        sent.add_callback(lambda md: _hand_over([(future, Written(md.topic, md.partition, md.offset), None)]))
        sent.add_errback(lambda err: _hand_over([(future, None, PublishError(str(err)))]))
        return future

    def close(self, timeout: float) -> None:
        from kafka.errors import KafkaError

        try:
            self._producer.close(timeout=timeout)
        except KafkaError as err:
            log_fields(log, 30, "producer closed with unacknowledged records (their calls got UNAVAILABLE)", error=str(err))
            # kafka-python leaves a producer open when its final flush times
            # out; stop its sender so nothing is retried after we said so.
            sender = getattr(self._producer, "_sender", None)
            if sender is not None:
                sender.force_close()
                sender.join(timeout)
            self._producer._closed = True


def make_event_producer(settings: Settings):
    if settings.feedback_producer == "kafka-python":
        return KafkaPythonProducer(settings)
    return LibrdkafkaProducer(settings)
