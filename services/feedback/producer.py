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
import logging
import threading
from collections import defaultdict, deque
from collections.abc import Callable
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


# (future, written, error, on_outcome): on_outcome(written, error) runs on the
# future's loop whether or not anyone still awaits the future.
Outcome = tuple[asyncio.Future, "Written | None", "Exception | None", "OnOutcome | None"]
OnOutcome = Callable[["Written | None", "Exception | None"], None]


def _settle(outcomes: list[Outcome]) -> None:
    """Resolve futures on their loop. A caller that stopped waiting (its
    deadline passed) has cancelled its future; its outcome still reaches
    `on_outcome`, which settles the write's bookkeeping."""
    for future, written, error, on_outcome in outcomes:
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(written)
        if on_outcome is not None:
            try:
                on_outcome(written, error)
            except Exception:  # noqa: BLE001 - one record's bookkeeping bug must not strand the batch's others
                log.exception("feedback write outcome callback failed")


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


def _identity_lost() -> frozenset:
    """Delivery errors after which this producer id cannot write any more.

    After a broker restart librdkafka may report these per record without
    raising a fatal error (Tansu answers PRODUCER_FENCED after a restart on
    durable storage, UNKNOWN_PRODUCER_ID after one in memory) and keep
    retrying with the old id for ever; the client must be replaced."""
    from confluent_kafka import KafkaError

    return frozenset(
        {
            KafkaError.UNKNOWN_PRODUCER_ID,
            KafkaError.PRODUCER_FENCED,
            KafkaError.INVALID_PRODUCER_EPOCH,
            KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
            KafkaError.INVALID_PRODUCER_ID_MAPPING,
        }
    )


class LibrdkafkaProducer:
    """confluent-kafka's idempotent producer, replaced when its producer id is lost.

    An idempotent producer that loses its producer id (a broker that restarted
    without its state, a fenced epoch) cannot write again: librdkafka refuses
    later records (a fatal error) or retries them for ever with the old id.
    The poll thread then builds a fresh client (a new producer id) and fails
    what the old one still held, so those calls get UNAVAILABLE and their
    retries, with the same request ids, go through the new client.
    """

    def __init__(self, settings: Settings):
        self._config = {
            "bootstrap.servers": settings.kafka_bootstrap,
            "enable.idempotence": True,  # implies acks=all, bounded in-flight, retries
            "acks": "all",
            "linger.ms": 1,
            "partitioner": "murmur2_random",  # same partition per key as Java / kafka-python clients
            "socket.nagle.disable": True,  # acks are latency-bound: send small requests at once
            "allow.auto.create.topics": False,  # only the platform creates topics (bus.create_topics)
            # Give up on a record about when its caller gives up on it, so a
            # record we reported UNAVAILABLE is rarely written much later.
            "message.timeout.ms": int(settings.kafka_timeout_s * 1000),
            "socket.timeout.ms": max(1000, int(settings.kafka_timeout_s * 1000)),
            "logger": get_logger("librdkafka"),  # its lines join our JSON logs (served by poll())
            "error_cb": self._on_error,
        }
        self._producer = self._client()
        # Connect now rather than on the first call (librdkafka connects lazily).
        self._producer.list_topics(timeout=settings.kafka_timeout_s)
        self._broken = None  # the client that hit a fatal error, until it is replaced
        self.replacements = 0
        self._delivered: deque[Outcome] = deque()  # filled by delivery callbacks inside poll()
        self._stop = threading.Event()
        # Delivery callbacks run inside poll(); one thread serves them all.
        self._poller = threading.Thread(target=self._poll, name="feedback-producer-poll", daemon=True)
        self._poller.start()

    def _client(self):
        from confluent_kafka import Producer

        return Producer(self._config)

    def send(
        self,
        topic: str,
        key: bytes,
        value: bytes,
        headers: list[tuple[str, bytes]],
        on_outcome: OnOutcome | None = None,
    ) -> asyncio.Future:
        """Queue one record; call on the event loop that will await the future.
        `on_outcome(written, error)` runs on that loop when the broker answers,
        even if the future was cancelled (its caller stopped waiting)."""
        from confluent_kafka import KafkaException

        future = asyncio.get_running_loop().create_future()
        delivered = self._delivered

        def on_delivery(err, msg) -> None:
            if err is not None:
                if err.fatal() or err.code() in _identity_lost():
                    self._mark_broken(producer)
                delivered.append((future, None, PublishError(f"{err.name()}: {err.str()}"), on_outcome))
            else:
                delivered.append((future, Written(msg.topic(), msg.partition(), msg.offset()), None, on_outcome))

        producer = self._producer
        try:
            producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
        except BufferError:
            # The local queue is full: the broker is slower than the input.
            raise PublishError("the producer's local queue is full; the broker is not keeping up") from None
        except KafkaException as err:
            if err.args[0].fatal() or producer.fatal_error() is not None:
                self._mark_broken(producer)  # the poll thread replaces it
            raise PublishError(str(err)) from None
        return future

    def close(self, timeout: float) -> None:
        self._stop.set()
        self._poller.join(timeout=2)
        left = self._producer.flush(timeout)  # serves the last callbacks on this thread
        self._dispatch()
        if left:
            log_fields(
                log, 30, "producer closed with unacknowledged records (their calls got UNAVAILABLE)", records=left
            )

    def _mark_broken(self, producer) -> None:
        """Have the poll thread replace `producer`, unless it was replaced already."""
        if producer is self._producer:
            self._broken = producer

    def _on_error(self, err) -> None:
        """librdkafka's error callback (inside poll): log; note fatal errors."""
        if err.fatal():
            self._mark_broken(self._producer)
        log_fields(
            log, 40 if err.fatal() else 30, "kafka client error", code=err.name(), error=err.str(), fatal=err.fatal()
        )

    def _dispatch(self) -> None:
        batch = []
        while self._delivered:
            batch.append(self._delivered.popleft())
        if batch:
            _hand_over(batch)

    def _replace(self, broken) -> None:
        self._producer = self._client()
        self._broken = None
        self.replacements += 1
        broken.purge()  # fail what it still held: those calls answer UNAVAILABLE
        broken.flush(0)  # serve their delivery reports
        self._dispatch()
        log_fields(log, logging.WARNING, "kafka producer replaced after a fatal error", replacements=self.replacements)

    def _poll(self) -> None:
        from confluent_kafka import KafkaException

        while not self._stop.is_set():
            producer = self._producer
            try:
                producer.poll(0.05)
            except KafkaException as err:  # a fatal error raised out of poll()
                self._mark_broken(producer)
                log_fields(log, logging.ERROR, "kafka client error", error=str(err), fatal=True)
            self._dispatch()
            if self._broken is not None:
                self._replace(self._broken)


class KafkaPythonProducer:
    """kafka-python's idempotent producer, replaced after a non-retriable error
    (e.g. an unknown producer id after the broker lost its state), as above."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._producer = bus.make_producer(settings)
        self._broken = None
        self.replacements = 0

    def send(
        self,
        topic: str,
        key: bytes,
        value: bytes,
        headers: list[tuple[str, bytes]],
        on_outcome: OnOutcome | None = None,
    ) -> asyncio.Future:
        from kafka.errors import KafkaError

        if self._broken is not None:
            self._replace(self._broken)
        future = asyncio.get_running_loop().create_future()
        producer = self._producer
        try:
            sent = producer.send(topic, key=key, value=value, headers=headers)
        except KafkaError as err:  # e.g. no metadata within max_block_ms: the broker is away
            raise PublishError(str(err)) from None

        def failed(err) -> None:
            if not getattr(err, "retriable", False):
                self._broken = producer
            _hand_over([(future, None, PublishError(str(err)), on_outcome)])

        sent.add_callback(
            lambda md: _hand_over([(future, Written(md.topic, md.partition, md.offset), None, on_outcome)])
        )
        sent.add_errback(failed)
        return future

    def _replace(self, broken) -> None:
        from kafka.errors import KafkaError

        try:
            self._producer = bus.make_producer(self._settings)
        except KafkaError as err:  # the broker is still away: keep the old one, try again on the next call
            raise PublishError(f"cannot reconnect: {err}") from None
        self._broken = None
        self.replacements += 1
        _close_kafka_python(broken, 0)
        log_fields(log, logging.WARNING, "kafka producer replaced after a fatal error", replacements=self.replacements)

    def close(self, timeout: float) -> None:
        _close_kafka_python(self._producer, timeout)


def _close_kafka_python(producer, timeout: float) -> None:
    from kafka.errors import KafkaError

    try:
        producer.close(timeout=timeout)
    except KafkaError as err:
        log_fields(
            log,
            logging.WARNING,
            "producer closed with unacknowledged records (their calls got UNAVAILABLE)",
            error=str(err),
        )
        # kafka-python leaves a producer open when its final flush times
        # out; stop its sender so nothing is retried after we said so.
        sender = getattr(producer, "_sender", None)
        if sender is not None:
            sender.force_close()
            sender.join(timeout)
        producer._closed = True


def make_event_producer(settings: Settings):
    if settings.feedback_producer == "kafka-python":
        return KafkaPythonProducer(settings)
    return LibrdkafkaProducer(settings)
