"""One way to build, run and stop every gRPC server of the platform.

Each server gets grpc.health.v1 (the library's HealthServicer), server
reflection, message-size limits, the metrics interceptor, the decode guard
(request bytes that are not a valid message, such as a string field that is
not valid UTF-8, get INVALID_ARGUMENT instead of grpc's bare INTERNAL), and
graceful shutdown on SIGTERM/SIGINT: health flips to NOT_SERVING, new calls
are refused, in-flight calls drain for the grace period, then the process exits.

Two flavours with one interface (port, set_serving, stop):
- `start_server`: grpc's thread-pool server, for handlers that compute
  (model forward passes release the GIL);
- `start_aio_server`: a grpc.aio server on its own event-loop thread, for
  handlers that mostly wait: the FeedbackService waits for broker acks, the
  PolicyService for its engine's tokens. One loop thread serves every call, so
  a call costs no thread hand-offs; on 2 cores that doubled the feedback
  service's throughput. `CallGate` counts such a server's calls and drains them.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.config import Settings
from services.common.errors import Status, StatusError, abort
from services.common.logs import get_logger, log_fields
from services.common.metrics import AioMetricsInterceptor, MetricsInterceptor

log = get_logger(__name__)


class _Undecodable:
    """Stands in for a request whose bytes did not parse; the handler refuses it."""

    def __init__(self, message: str):
        self.message = message


def _guarded_deserializer(deserializer):
    message_type = getattr(deserializer, "__self__", None)  # Message.FromString's class
    name = getattr(getattr(message_type, "DESCRIPTOR", None), "full_name", "request")

    def parse(raw: bytes):
        try:
            return deserializer(raw)
        except Exception:  # noqa: BLE001 - DecodeError or the runtime's own; every parse failure is the caller's
            return _Undecodable(
                f"the request is not a valid {name} message "
                "(undecodable bytes, or a string field that is not valid UTF-8)"
            )

    return parse


def _guarded_handler(handler, refuse):
    """`handler` with a deserializer that never raises, and behaviours that
    answer `refuse(context, message)` for a request that did not parse."""
    if handler is None or handler.request_deserializer is None:
        return handler
    guarded = handler._replace(request_deserializer=_guarded_deserializer(handler.request_deserializer))
    return _wrap_behaviours(guarded, refuse)


def _wrap_behaviours(handler, refuse):
    if handler.unary_unary or handler.unary_stream:
        field = "unary_unary" if handler.unary_unary else "unary_stream"
        behaviour = getattr(handler, field)

        def unary(request, context):
            if isinstance(request, _Undecodable):
                return refuse(context, request.message)
            return behaviour(request, context)

        return handler._replace(**{field: unary})
    field = "stream_unary" if handler.stream_unary else "stream_stream"
    behaviour = getattr(handler, field)

    def checked(requests, context):
        for request in requests:
            if isinstance(request, _Undecodable):
                refuse(context, request.message)
            yield request

    return handler._replace(**{field: lambda requests, context: behaviour(checked(requests, context), context)})


def _refuse(context, message: str):
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)


class DecodeGuardInterceptor(grpc.ServerInterceptor):
    """Undecodable requests get INVALID_ARGUMENT on every method of a thread-pool server."""

    def intercept_service(self, continuation, handler_call_details):
        return _guarded_handler(continuation(handler_call_details), _refuse)


class AioDecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    """The same for grpc.aio servers (methods that deserialise themselves, such
    as the FeedbackService's, are left alone)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        handler = handler._replace(request_deserializer=_guarded_deserializer(handler.request_deserializer))
        if handler.unary_unary or handler.unary_stream:
            field = "unary_unary" if handler.unary_unary else "unary_stream"
            behaviour = getattr(handler, field)
            streaming = field == "unary_stream"

            async def unary(request, context):
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                return await behaviour(request, context)

            async def unary_stream(request, context):
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                result = behaviour(request, context)
                if inspect.isasyncgen(result):
                    async for reply in result:
                        yield reply
                else:  # a coroutine that writes with context.write
                    await result

            return handler._replace(**{field: unary_stream if streaming else unary})
        return handler  # client-streaming aio methods of ours read raw bytes


@dataclass
class RunningServer:
    server: grpc.Server
    health: health.HealthServicer
    port: int
    service_names: list[str]

    def set_serving(self, serving: bool = True) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.service_names + [""]:
            self.health.set(name, status)

    def stop(self, grace: float) -> None:
        self.set_serving(False)
        self.server.stop(grace).wait()


def channel_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
        ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
    ]


def start_server(
    settings: Settings,
    service: str,
    register: Iterable[Callable[[grpc.Server], str]],
    port: int,
    interceptors: Iterable[grpc.ServerInterceptor] = (),
) -> RunningServer:
    """Start a server on bind_host:port (0 picks a free port).

    Each `register` callable adds one servicer to the server and returns its
    full service name (e.g. "rlhf.v1.PolicyService") for health and reflection.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.grpc_workers, thread_name_prefix=f"{service}-rpc"),
        interceptors=[MetricsInterceptor(service), DecodeGuardInterceptor(), *interceptors],
        options=channel_options(settings) + [("grpc.so_reuseport", 0)],
    )
    names = [reg(server) for reg in register]
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    bound = _add_standard_services(settings, service, server, health_servicer, names, port)
    server.start()
    running = RunningServer(server, health_servicer, bound, names)
    running.set_serving(True)
    log_fields(log, logging.INFO, "grpc server started", component=service, port=bound, services=names)
    return running


def _add_standard_services(
    settings: Settings, service: str, server, health_servicer, names: list[str], port: int
) -> int:
    """Health and reflection on `server`, bound to bind_host:port; return the port."""
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        names + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    bound = server.add_insecure_port(f"{settings.bind_host}:{port}")
    if bound == 0:
        raise RuntimeError(f"{service}: could not bind {settings.bind_host}:{port}")
    return bound


class AioRunningServer:
    """A grpc.aio server running on its own event-loop thread; RunningServer's interface."""

    def __init__(
        self,
        settings: Settings,
        service: str,
        register: Iterable[Callable[[grpc.aio.Server], str]],
        port: int,
        drain: Callable[[float], Awaitable[None]] | None = None,
    ):
        self.drain = drain
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=f"{service}-aio", daemon=True)
        self._thread.start()
        try:
            self.server, self.health, self.port, self.service_names = self._call(
                self._start(settings, service, register, port)
            )
        except BaseException:
            self._close_loop()
            raise

    async def _start(self, settings, service, register, port):
        server = grpc.aio.server(
            interceptors=[AioMetricsInterceptor(service), AioDecodeGuardInterceptor()],
            options=channel_options(settings) + [("grpc.so_reuseport", 0)],
        )
        names = [reg(server) for reg in register]
        health_servicer = health.aio.HealthServicer()
        bound = _add_standard_services(settings, service, server, health_servicer, names, port)
        await server.start()
        return server, health_servicer, bound, names

    def _call(self, coro, timeout: float | None = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _set_all(self, status) -> None:
        for name in self.service_names + [""]:
            await self.health.set(name, status)

    def set_serving(self, serving: bool = True) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self._call(self._set_all(status))

    def stop(self, grace: float) -> None:
        """Drain, then stop. grpc.aio cancels a call that arrives once stop()
        began, and clients do not retry CANCELLED; `drain` (when given) first
        refuses new calls itself, with UNAVAILABLE, which clients retry, while
        the calls in progress finish, for up to `grace` seconds in all."""
        if self.loop.is_closed():
            return
        self.set_serving(False)
        started = time.monotonic()
        if self.drain is not None:
            self._call(self.drain(grace), timeout=grace + 30)
        left = max(0.0, grace - (time.monotonic() - started))
        self._call(self.server.stop(left), timeout=left + 30)
        self._close_loop()

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class CallGate:
    """The calls in progress on a grpc.aio server (all on its one loop thread),
    and its drain: once shutting down, new calls are refused with UNAVAILABLE
    (clients retry those, e.g. on another replica) while the calls in progress
    finish (AioRunningServer's `drain`). `limit` caps the calls in progress
    (RESOURCE_EXHAUSTED beyond it); `limit_name` is its setting, for the message."""

    def __init__(self, service: str, limit: int | None = None, limit_name: str = ""):
        self.service = service
        self.limit = limit
        self.limit_name = limit_name
        self.calls = 0
        self.draining = False

    def _enter(self) -> None:
        """Count a call in, or raise the StatusError that refuses it."""
        if self.draining:
            raise StatusError(Status.UNAVAILABLE, f"the {self.service} service is shutting down; retry")
        if self.limit is not None and self.calls >= self.limit:
            raise StatusError(
                Status.RESOURCE_EXHAUSTED,
                f"{self.calls} {self.service} calls in progress ({self.limit_name}={self.limit}); retry with backoff",
            )
        self.calls += 1

    def _leave(self) -> None:
        self.calls -= 1

    async def admit(self, context: grpc.aio.ServicerContext, refuse=abort) -> None:
        """Count the call in until it ends, however it ends (a done callback: a streaming
        handler's `finally` may never run when the client cancels), or fail it with
        `await refuse(context, StatusError)`, which must abort the call."""
        try:
            self._enter()
        except StatusError as err:
            await refuse(context, err)
        context.add_done_callback(lambda _: self._leave())

    async def drain(self, grace: float) -> None:
        """Refuse new calls, and wait up to `grace` seconds for those in progress."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.calls and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self.calls:
            log_fields(
                log,
                logging.WARNING,
                "shutting down with calls still in progress",
                component=self.service,
                calls=self.calls,
                grace_s=grace,
            )


def start_aio_server(
    settings: Settings,
    service: str,
    register: Iterable[Callable[[grpc.aio.Server], str]],
    port: int,
    drain: Callable[[float], Awaitable[None]] | None = None,
) -> AioRunningServer:
    """Like start_server, for async handlers; each `register` gets a grpc.aio.Server.
    `drain(grace)`: see AioRunningServer.stop."""
    running = AioRunningServer(settings, service, register, port, drain)
    running.set_serving(True)
    log_fields(
        log,
        20,
        "grpc server started",
        component=service,
        port=running.port,
        services=running.service_names,
        flavour="aio",
    )
    return running


def serve_until_signal(
    running: RunningServer | AioRunningServer, grace: float, on_stop: Callable[[], None] | None = None
) -> None:
    """Block until SIGTERM or SIGINT, then drain for `grace` seconds and return."""
    stop = threading.Event()

    def handle(signum, _frame):
        log_fields(log, logging.INFO, "shutdown requested", signal=signal.Signals(signum).name, grace_s=grace)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    # The kernel may hand the signal to any thread (gRPC's, Kafka's); Python then only sets a flag,
    # and the main thread runs `handle` when it next runs Python code. A wait without a timeout
    # could sleep through it: a CI run saw a SIGTERM handled only when a second one came, 10 s on.
    while not stop.wait(0.2):
        pass
    running.stop(grace)
    if on_stop:
        on_stop()
    log_fields(log, logging.INFO, "grpc server stopped", port=running.port)


def wait_for_serving(target: str, timeout: float = 60.0, service: str = "", while_alive=None) -> None:
    """Poll grpc.health.v1 on `target` until it reports SERVING or raise TimeoutError.

    `while_alive` (a Popen) stops the wait early with RuntimeError if that
    process exits first.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if while_alive is not None and while_alive.poll() is not None:
                raise RuntimeError(
                    f"the server process exited with status {while_alive.returncode} before {target} was SERVING"
                )
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as err:
                last = err
            time.sleep(0.2)
    raise TimeoutError(f"{target} did not report SERVING within {timeout:.0f}s ({last})")
