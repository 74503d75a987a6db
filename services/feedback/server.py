"""FeedbackService: records prompts, demonstrations, K-way rankings and labels
as protobuf events on Kafka.

Every call is authenticated (the caller's id comes from its bearer token,
never from the payload), validated (nothing is written on a bad field),
de-duplicated by request id, and answered only after the broker acknowledged
the write (idempotent producer, acks=all). A broker that does not answer
within the deadline gives UNAVAILABLE, and the request counts as not written.

Requests are deserialised here rather than by grpc, so that text that is not
valid UTF-8 is refused with INVALID_ARGUMENT naming the field instead of a
bare INTERNAL error.

The handlers are coroutines on a grpc.aio server: a call spends nearly all
its time waiting for the broker, and one event loop serves thousands of such
waits without a thread per call (see services/common/grpc_server.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import NoReturn

import grpc
from google.protobuf.message import DecodeError, Message
from rlhf.v1 import feedback_pb2

from services.common import bus
from services.common.auth import Authenticator, Identity, load_tokens
from services.common.config import Settings
from services.common.errors import Status, StatusError, grpc_code
from services.common.feedback import BY_BULK_FIELD, KINDS, VALIDATE_FIRST, InvalidField, Limits
from services.common.grpc_server import AioRunningServer, CallGate, start_aio_server
from services.common.logs import get_logger, log_fields
from services.common.metrics import EVENTS_WRITTEN
from services.feedback.events import Prepared, prepare
from services.feedback.idempotency import Entry, IdempotencyCache
from services.feedback.producer import PublishError, make_event_producer
from services.feedback.validation import locate_bad_utf8

log = get_logger(__name__)

SERVICE_NAME = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name
UNARY_METHODS = {kind.rpc: key for key, kind in KINDS.items()}  # method name -> kind


_END = object()  # the bulk request stream ended


def parse(raw: bytes, message_type: type[Message], field: str = "request") -> Message:
    try:
        return message_type.FromString(raw)
    except DecodeError:
        bad = locate_bad_utf8(raw, message_type.DESCRIPTOR)
        if bad:
            raise InvalidField(bad if field == "request" else f"{field}.{bad}", "is not valid UTF-8") from None
        raise InvalidField(field, f"is not a valid {message_type.DESCRIPTOR.full_name} message") from None


@dataclass
class _Pending:
    """A write in flight: ours (`future` set) or another call's (`entry` only)."""

    prepared: Prepared
    entry: Entry
    owner: bool
    identity: Identity
    future: asyncio.Future | None = None


def _reply(prepared: Prepared, written) -> feedback_pb2.SubmitReply:
    return feedback_pb2.SubmitReply(
        event_id=prepared.event_id, topic=written.topic, partition=written.partition, offset=written.offset
    )


class FeedbackServicer:
    def __init__(self, settings: Settings, producer, authenticator: Authenticator):
        self.settings = settings
        self.producer = producer
        self.auth = authenticator
        self.limits = Limits.from_settings(settings)
        self.topics = bus.Topics.from_settings(settings)
        self.cache = IdempotencyCache(settings.feedback_idempotency_entries)
        # The calls in progress; on shutdown new calls are refused while those finish.
        self.calls = CallGate("feedback", settings.feedback_max_calls, "RLHF_FEEDBACK_MAX_CALLS")
        # (deadline, event id, entry) of the writes in flight, in send order (see _expire_later)
        self._expiries: deque[tuple[float, str, Entry]] = deque()
        self._expiry_timer: asyncio.TimerHandle | None = None

    def register(self, server: grpc.Server) -> str:
        reply = feedback_pb2.SubmitReply.SerializeToString
        handlers = {
            method: grpc.unary_unary_rpc_method_handler(self._unary_handler(kind), response_serializer=reply)
            for method, kind in UNARY_METHODS.items()
        }
        handlers["BulkSubmit"] = grpc.stream_stream_rpc_method_handler(self.BulkSubmit, response_serializer=reply)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        return SERVICE_NAME

    # --- unary calls ------------------------------------------------------------
    def _unary_handler(self, kind: str):
        spec = KINDS[kind]

        async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> feedback_pb2.SubmitReply:
            identity = await self.auth.require_aio(context, spec.role)
            await self._admit(context, identity, kind)
            try:
                prepared = prepare(kind, parse(raw, spec.request_type), identity, self.limits)
                return await self._finish(self._begin(prepared, identity), context)
            except StatusError as err:  # InvalidField included
                await self._refuse(context, err, identity, kind)

        handle.__name__ = kind
        return handle

    # --- bulk import --------------------------------------------------------------
    async def BulkSubmit(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[feedback_pb2.SubmitReply]:
        """One reply per item, in order, each after the broker acknowledged it.

        A reader task receives, validates and sends items while this one
        waits for acks and writes replies, so neither direction waits for the
        other (up to RLHF_FEEDBACK_BULK_WINDOW items in flight). The first bad
        item ends the stream with its status, naming it as `items[i]...`;
        every item before it is acknowledged first.

        With the call metadata VALIDATE_FIRST, the stream is one submission
        (e.g. a labeler's ranking, labels and demonstration): every item is
        checked before any is sent, so a bad one writes nothing at all.
        """
        identity = await self.auth.require_aio(context, "user")
        await self._admit(context, identity, "bulk")
        validate_first = VALIDATE_FIRST in (context.invocation_metadata() or ())
        replies = (
            self._whole(request_iterator, context, identity)
            if validate_first
            else self._bulk(request_iterator, context, identity)
        )
        async for reply in replies:
            yield reply

    async def _whole(self, request_iterator, context, identity: Identity) -> AsyncIterator[feedback_pb2.SubmitReply]:
        """A validate-first stream: read and check every item, then send them all."""
        window = self.settings.feedback_bulk_window
        prepared: list[Prepared] = []
        try:
            async for raw in request_iterator:
                if len(prepared) == window:
                    raise InvalidField(
                        "items", f"a validate-first stream holds at most {window} items (RLHF_FEEDBACK_BULK_WINDOW)"
                    )
                prepared.append(self._prepare_item(len(prepared), raw, identity))
        except StatusError as err:
            await self._refuse(context, err, identity, "bulk")
        try:
            # A broker fault part-way can leave a prefix written: the client's
            # retry with the same request ids completes it without duplicates.
            # Each write settles its own request id, even if the stream ends first.
            pending = [self._begin(item, identity) for item in prepared]
            for item in pending:
                yield await self._finish(item, context)
        except StatusError as err:
            await self._refuse(context, err, identity, "bulk")

    async def _admit(self, context, identity: Identity, kind: str) -> None:
        """Count the call in, or refuse it: shutting down, or RLHF_FEEDBACK_MAX_CALLS in progress."""

        async def refuse(context, err: StatusError) -> None:
            await self._refuse(context, err, identity, kind)

        await self.calls.admit(context, refuse)

    async def _bulk(self, request_iterator, context, identity: Identity) -> AsyncIterator[feedback_pb2.SubmitReply]:
        pipeline: asyncio.Queue = asyncio.Queue(maxsize=self.settings.feedback_bulk_window)

        async def read() -> None:
            try:
                index = 0
                async for raw in request_iterator:
                    item = self._begin(self._prepare_item(index, raw, identity), identity)
                    await pipeline.put(item)  # waits while the window is full: the broker is behind
                    index += 1
                await pipeline.put(_END)
            except StatusError as err:  # InvalidField included
                await pipeline.put(err)
            except Exception as err:  # noqa: BLE001 - whatever broke the client's stream ends it as CANCELLED
                await pipeline.put(StatusError(Status.CANCELLED, f"request stream failed: {err}"))

        reader = asyncio.get_running_loop().create_task(read(), name="feedback-bulk-reader")
        try:
            while True:
                item = await pipeline.get()
                if item is _END:
                    return
                if isinstance(item, StatusError):  # everything before it was answered already
                    await self._refuse(context, item, identity, "bulk")
                try:
                    reply = await self._finish(item, context)
                except StatusError as err:
                    await self._refuse(context, err, identity, "bulk")
                yield reply
        finally:
            # The stream ended early (error, cancel): the writes already sent
            # settle their request ids when the broker answers, so a retry
            # returns their replies or, if they failed, sends them again.
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    def _prepare_item(self, index: int, raw: bytes, identity: Identity) -> Prepared:
        item = parse(raw, feedback_pb2.BulkItem, f"items[{index}]")
        which = item.WhichOneof("item")
        if which is None:
            raise InvalidField(f"items[{index}]", "is empty; set prompt, demonstration, comparison or labels")
        kind = BY_BULK_FIELD[which]
        if not identity.may(kind.role):
            raise StatusError(
                Status.PERMISSION_DENIED,
                f"items[{index}].{which}: role {identity.role!r} may not submit this; needs {kind.role!r}",
            )
        try:
            return prepare(kind.key, getattr(item, which), identity, self.limits)
        except InvalidField as err:
            raise err.within(f"items[{index}].{which}") from None

    # --- the write path ---------------------------------------------------------
    def _begin(self, prepared: Prepared, identity: Identity) -> _Pending:
        """Reserve the event id and send the event (or join the first request's send)."""
        entry, owner = self.cache.reserve(prepared.event_id, prepared.fingerprint)
        if not owner:
            if entry.fingerprint != prepared.fingerprint:
                raise StatusError(
                    Status.ALREADY_EXISTS,
                    f"request_id {prepared.event.request_id!r} was already used for a different request;"
                    " use a new request_id",
                )
            return _Pending(prepared, entry, owner=False, identity=identity)
        return self._send(prepared, entry, identity)

    def _send(self, prepared: Prepared, entry: Entry, identity: Identity) -> _Pending:
        """Publish the event of an entry this call owns; the write settles the entry itself.

        The entry settles when the broker answers, whether or not the calling
        client still waits (grpc.aio cancels a handler whose deadline passed):
        the producer runs the outcome callback even for a cancelled future. A
        write not acknowledged within the broker timeout counts as failed
        (`_expire`), so a retry takes it over; a later ack still wins."""
        event = prepared.event
        key = prepared.event_id

        def settled(written, error) -> None:
            if error is not None:
                if not future.cancelled():
                    future.exception()  # retrieved here: a bulk stream that ended early never awaits it
                self.cache.fail(key, entry, StatusError(Status.UNAVAILABLE, f"broker refused the write: {error}"))
                return
            self.cache.complete(key, entry, _reply(prepared, written))
            EVENTS_WRITTEN.labels(written.topic).inc()

        try:
            future = self.producer.send(
                self.topics.name(prepared.kind),
                key=identity.user_id.encode(),  # one user's events stay in order on one partition
                value=event.SerializeToString(),
                headers=bus.headers_for(event),
                on_outcome=settled,
            )
        except PublishError as err:
            refusal = StatusError(Status.UNAVAILABLE, f"broker unavailable: {err}")
            self.cache.fail(key, entry, refusal)
            raise refusal from None
        self._expire_later(key, entry)
        return _Pending(prepared, entry, owner=True, identity=identity, future=future)

    def _expire_later(self, key: str, entry: Entry) -> None:
        """Fail `entry` if the broker has not answered within RLHF_KAFKA_TIMEOUT_S.

        Every write gets the same timeout, so their deadlines come in send
        order: one queue and one loop timer serve them all (a timer per write
        cost a heap push, a cancel and a callback on the hot path)."""
        loop = asyncio.get_running_loop()
        queue = self._expiries
        while queue and queue[0][2].done.is_set():  # settled already: nothing to expire
            queue.popleft()
        queue.append((loop.time() + self.settings.kafka_timeout_s, key, entry))
        if self._expiry_timer is None:
            self._expiry_timer = loop.call_at(queue[0][0], self._expire)

    def _expire(self) -> None:
        loop = asyncio.get_running_loop()
        queue, now, limit = self._expiries, loop.time(), self.settings.kafka_timeout_s
        while queue and (queue[0][0] <= now or queue[0][2].done.is_set()):
            _, key, entry = queue.popleft()
            if not entry.done.is_set():
                self.cache.fail(
                    key, entry, StatusError(Status.UNAVAILABLE, f"broker did not acknowledge within {limit:.1f}s")
                )
        self._expiry_timer = loop.call_at(queue[0][0], self._expire) if queue else None

    async def _finish(self, item: _Pending, context) -> feedback_pb2.SubmitReply:
        """Wait for the broker's ack (within the call's deadline) and build the reply.

        A retry of a request still in flight waits for that write; if it
        failed, the retry takes the request id over and publishes again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout(context)
        while not item.owner:
            try:
                return await item.entry.wait_async(max(0.0, deadline - loop.time()))
            except TimeoutError as err:
                raise StatusError(Status.UNAVAILABLE, f"{err}; retry with the same request_id") from None
            except Exception:  # noqa: BLE001 - the first write failed, whatever its error: take it over
                entry, owner = self.cache.reserve(item.prepared.event_id, item.prepared.fingerprint)
                item = (
                    self._send(item.prepared, entry, item.identity)
                    if owner
                    else _Pending(item.prepared, entry, owner=False, identity=item.identity)
                )
        timeout = max(0.01, deadline - loop.time())
        try:
            if item.future.done():  # common in bulk imports: acked while earlier replies were written
                written = item.future.result()
            else:
                # A cancelled call (client deadline) cancels only its wait: the
                # write still settles its entry through its outcome callback.
                async with asyncio.timeout(timeout):
                    written = await item.future
        except (PublishError, TimeoutError) as err:
            raise StatusError(
                Status.UNAVAILABLE,
                f"broker did not acknowledge within {timeout:.1f}s ({str(err) or type(err).__name__});"
                " retry with the same request_id (a late write is de-duplicated by event id)",
            ) from None
        # The outcome callback built the reply already (unless a timeout failed
        # the entry before this late ack): answer with that one.
        return item.entry.reply if item.entry.reply is not None else _reply(item.prepared, written)

    def _timeout(self, context) -> float:
        remaining = context.time_remaining() if context is not None else None
        limit = self.settings.kafka_timeout_s
        if remaining is not None:
            limit = min(limit, remaining - 0.05)  # answer UNAVAILABLE before the client gives up
        return max(0.01, limit)

    async def _refuse(self, context, err: StatusError, identity: Identity | None, kind: str) -> NoReturn:
        """Log and fail the call with err's status (context.abort raises)."""
        log_fields(
            log,
            logging.INFO,
            "feedback refused",
            code=err.status.name,
            error=str(err),
            kind=kind,
            user_id=identity.user_id if identity else "",
        )
        await context.abort(grpc_code(err.status), str(err))
        raise AssertionError("context.abort returned")  # unreachable: abort raises


@dataclass
class FeedbackHandle:
    running: AioRunningServer
    servicer: FeedbackServicer

    @property
    def port(self) -> int:
        return self.running.port

    def stop(self, grace: float = 0) -> None:
        self.running.stop(grace)
        self.servicer.producer.close(max(1.0, grace))


def start(settings: Settings, port: int = 0) -> FeedbackHandle:
    """Create the topics, connect the producer and serve FeedbackService on `port` (0: any free port)."""
    tokens = load_tokens(settings)
    if not tokens:
        log_fields(
            log,
            logging.WARNING,
            "no bearer tokens configured (RLHF_TOKENS / RLHF_TOKENS_FILE): every call will be refused",
        )
    bus.create_topics(settings)
    producer = make_event_producer(settings)
    servicer = FeedbackServicer(settings, producer, Authenticator(tokens))
    try:
        running = start_aio_server(settings, "feedback", [servicer.register], port, drain=servicer.calls.drain)
    except Exception:
        producer.close(1)
        raise
    return FeedbackHandle(running, servicer)
