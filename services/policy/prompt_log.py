"""API prompts become training data: every prompt the policy serves, through
gRPC (`api`), the OpenAI-compatible routes (`openai`) or the TGI-compatible
routes (`tgi`), is logged to the prompts topic as a PromptEvent.

- Attribution: `user_id` is the caller's token's user, never a payload field;
  `source` names the API and `metadata.model_version` the version serving when
  the prompt was accepted. The dataset builder then applies the same rules as
  to the playground's prompts (200 per user, de-duplication, user-disjoint
  splits, PII scrubbing).
- Opt-out: per token (`log_prompts` in RLHF_TOKENS_FILE, `:nolog` in
  RLHF_TOKENS; on by default for `user` tokens, off for labelers and admins),
  per request (the `rlhf-log-prompt: false` header or gRPC metadata; OpenAI
  requests may also send `"store": false`), or for the whole service
  (RLHF_PROMPT_LOG=false). Anonymous callers (RLHF_ANONYMOUS_GENERATE) are
  never logged: there is no user to attribute their prompts to.
- Generation never waits for the broker and never fails because of it:
  `record()` only appends to a bounded buffer (RLHF_PROMPT_LOG_BUFFER). One
  background thread sends batches with the platform's idempotent producer
  (services.common.bus), retries with backoff while the broker is away, and
  builds a fresh producer after a failure. A prompt that finds the buffer full
  is dropped, counted in `rlhf_prompt_log_dropped_total{reason}` and reported
  in a (rate-limited) warning.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable

from rlhf.v1 import common_pb2, events_pb2

from services.common import bus
from services.common.auth import Identity
from services.common.config import Settings
from services.common.errors import invalid
from services.common.logs import get_logger, log_fields
from services.common.metrics import EVENTS_WRITTEN, PROMPT_LOG_BUFFERED, PROMPT_LOG_DROPPED

log = get_logger(__name__)

# Per-request opt-out (HTTP header or gRPC metadata key).
LOG_HEADER = "rlhf-log-prompt"
SOURCES = ("api", "openai", "tgi")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
BATCH = 256
WARN_EVERY_S = 10.0
MAX_BACKOFF_S = 5.0


def wanted(identity: Identity, header: str | None) -> bool:
    """Whether this request's prompt is logged: the request's header, else the token's default."""
    if identity.anonymous:
        return False
    if header is None or not header.strip():
        return identity.logs_prompts
    value = header.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise invalid(f"{LOG_HEADER} must be true or false; got {header!r}")


def _discard(producer) -> None:
    """Close a producer whose records may still be pending. kafka-python's close()
    flushes first and raises when that times out, leaving its sender thread up;
    then do what close() would have done next: force the sender down."""
    try:
        producer.close(timeout=0.5)
    except Exception:  # noqa: BLE001 - KafkaTimeoutError, or whatever the broken connection raised
        producer._sender.force_close()
        producer._closed = True  # nothing left to close; keeps __del__ from trying again


class PromptLog:
    """The policy's prompt logger; see the module docstring."""

    def __init__(self, settings: Settings, service: str = "policy"):
        self.settings = settings
        self.service = service
        self.topic = bus.Topics.from_settings(settings).name("prompts")
        self.capacity = settings.prompt_log_buffer
        self._buffer: deque[events_pb2.PromptEvent] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="prompt-log", daemon=True)
        self.written = 0
        self.dropped = 0
        self._unwarned_drops = 0
        self._warned_at = 0.0
        self._broker_ok = True

    def start(self) -> PromptLog:
        self._thread.start()
        return self

    # --- the request path: never blocks on the broker -------------------------------
    def record(
        self,
        identity: Identity,
        source: str,
        version: str,
        text: str,
        messages: Iterable[dict] = (),
        extra: dict[str, str] | None = None,
    ) -> str:
        """Queue one served prompt; return its event id ("" if it was dropped)."""
        event = events_pb2.PromptEvent(
            event_id=f"ev-{uuid.uuid4().hex}",
            request_id=f"{source}-{uuid.uuid4().hex}",
            user_id=identity.user_id,
            text=text,
            messages=[common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
            source=source,
            metadata={"model_version": version, "service": self.service, **(extra or {})},
            created_unix_ms=int(time.time() * 1000),
        )
        event.prompt_id = event.event_id
        with self._cv:
            if self._stopping or len(self._buffer) >= self.capacity:
                self._drop(1, "stopping" if self._stopping else "buffer_full")
                return ""
            self._buffer.append(event)
            PROMPT_LOG_BUFFERED.set(len(self._buffer))
            self._cv.notify()
        return event.event_id

    def _drop(self, n: int, reason: str) -> None:
        """Count `n` lost prompts and warn, at most every WARN_EVERY_S (call with the lock held)."""
        self.dropped += n
        PROMPT_LOG_DROPPED.labels(reason).inc(n)
        self._unwarned_drops += n
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_S:
            log_fields(
                log,
                logging.WARNING,
                "served prompts dropped from the training-data log",
                dropped=self._unwarned_drops,
                reason=reason,
                dropped_total=self.dropped,
                buffer=self.capacity,
                topic=self.topic,
            )
            self._warned_at, self._unwarned_drops = now, 0

    # --- the background sender ---------------------------------------------------------
    def _take(self) -> list[events_pb2.PromptEvent]:
        with self._cv:
            while not self._buffer and not self._stopping:
                self._cv.wait()
            return [self._buffer.popleft() for _ in range(min(BATCH, len(self._buffer)))]

    def _requeue(self, events: list[events_pb2.PromptEvent]) -> None:
        with self._cv:
            self._buffer.extendleft(reversed(events))
            PROMPT_LOG_BUFFERED.set(len(self._buffer))

    def _run(self) -> None:
        producer, backoff = None, 0.5
        while True:
            batch = self._take()
            if not batch:
                break  # stopping and nothing left
            try:
                if producer is None:
                    # The platform creates its topics (with the configured partitions), never a client's
                    # first write; the policy is part of the platform, as the checkpoint follower is.
                    bus.create_topics(self.settings, ["prompts"], timeout=self.settings.kafka_timeout_s)
                    producer = bus.make_producer(self.settings)
                self._send(producer, batch)
                backoff = 0.5
                if not self._broker_ok:
                    self._broker_ok = True
                    log_fields(log, logging.INFO, "prompt log reaches the broker again", topic=self.topic)
            except Exception as err:  # noqa: BLE001 - whatever failed (broker, client), keep the prompts and retry
                with self._cv:
                    if self._stopping:
                        self._drop(len(batch), "stopping")
                        break
                self._requeue(batch)
                if self._broker_ok:
                    self._broker_ok = False
                    log_fields(
                        log,
                        logging.WARNING,
                        "prompt log cannot reach the broker; buffering",
                        error=repr(err),
                        topic=self.topic,
                    )
                if producer is not None:  # a fresh producer after a failure (new connections, new producer id)
                    _discard(producer)
                    producer = None
                with self._cv:
                    if self._stopping:
                        break
                    self._cv.wait(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
            PROMPT_LOG_BUFFERED.set(len(self._buffer))
        if producer is not None:
            _discard(producer)

    def _send(self, producer, batch: list[events_pb2.PromptEvent]) -> None:
        """Send a batch and wait for every ack; raise on the first failure (the
        whole batch is retried; the builder de-duplicates by event id)."""
        futures = [
            producer.send(
                self.topic,
                key=event.user_id.encode(),
                value=event.SerializeToString(),
                headers=bus.headers_for(event),
            )
            for event in batch
        ]
        for future in futures:
            future.get(timeout=self.settings.kafka_timeout_s)
        self.written += len(batch)
        EVENTS_WRITTEN.labels(self.topic).inc(len(batch))

    # --- shutdown ----------------------------------------------------------------------
    def stop(self, flush_s: float = 2.0) -> None:
        """Send what is buffered for up to `flush_s`, then count the rest as dropped."""
        if not self._thread.is_alive():
            return
        deadline = time.monotonic() + flush_s
        while time.monotonic() < deadline and self._buffer and self._broker_ok:
            time.sleep(0.02)
        with self._cv:
            self._stopping = True
            left = len(self._buffer)
            self._buffer.clear()
            if left:
                self._drop(left, "stopping")
            self._cv.notify_all()
        # A send in flight ends on its own (the broker's timeout); the thread then exits.
        self._thread.join(timeout=max(flush_s, 0.5))
