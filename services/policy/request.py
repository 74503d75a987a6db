"""One generation request as a backend sees it, and the events it sends back.

A backend (the local continuous-batching engine or the TGI client) pushes
events into the request's sink from its own thread: `Token` while decoding
(streaming requests only; a sample's last one carries `final`), `SampleDone`
per finished sample, then exactly one `Finished` or `Failed`. The sink is a hop
onto the servers' asyncio loop (`loop_sink`), or a blocking queue for threads.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from services.common.errors import Status, StatusError
from services.policy.params import GenParams, SampleOut, TokenOut


@dataclass
class Token:
    sample_index: int
    token: TokenOut
    version: str
    final: SampleOut | None = None  # set on a sample's last token (streaming consumers end the sample here)


@dataclass
class SampleDone:
    sample: SampleOut
    version: str


@dataclass
class Finished:
    version: str
    prompt_tokens: int
    completion_tokens: int
    # With params.prompt_logprobs: every prompt token, each scored given the
    # ones before it (the first has no logprob), as TGI's details.prefill.
    prefill: list[TokenOut] = field(default_factory=list)


@dataclass
class Failed:
    error: StatusError  # the backend's own outcome; the gRPC and HTTP edges map its status


Event = Token | SampleDone | Finished | Failed


class GenRequest:
    def __init__(
        self,
        prompt_ids: list[int],
        params: GenParams,
        sink: Callable[[Event], None],
        stream: bool = False,
        deadline: float | None = None,
        prompt_text: str = "",
    ):
        self.prompt_ids = prompt_ids
        self.prompt_text = prompt_text  # the rendered text, for backends that take text (TGI)
        self.params = params
        self.sink = sink
        self.stream = stream
        self.deadline = deadline  # time.monotonic() value, or None
        self.submitted = time.monotonic()
        self._cancelled = threading.Event()
        self._on_cancel: list[Callable[[], None]] = []
        self.closed = False  # set by the backend once Finished/Failed was sent

    # --- cancellation (client went away) ---------------------------------
    def cancel(self) -> None:
        if not self._cancelled.is_set():
            self._cancelled.set()
            for hook in self._on_cancel:
                hook()

    def on_cancel(self, hook: Callable[[], None]) -> None:
        self._on_cancel.append(hook)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now or time.monotonic()) >= self.deadline

    # --- sending events (backend side) -----------------------------------
    def emit(self, event: Event) -> None:
        if self.closed:
            return
        if isinstance(event, (Finished, Failed)):
            self.closed = True
        self.sink(event)

    def fail(self, status: Status, message: str) -> None:
        self.emit(Failed(StatusError(status, message)))


class _Mailbox:
    """Events for the queues of one event loop, handed over in batches: the first event since
    the last hand-over wakes the loop (call_soon_threadsafe: a write to its self-pipe), and the
    rest of a decode step's events, one per streaming row, ride along with it. Measured in the
    policy server under 32 streaming clients, a wake-up per event was ~2.5% of the engine
    thread's time."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)  # the mailbox lives as long as its loop, not longer
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Event]] = []

    def post(self, events: asyncio.Queue, event: Event) -> None:
        with self._lock:
            self._pending.append((events, event))
            if len(self._pending) > 1:
                return  # a hand-over is already on its way
        loop = self._loop()
        try:
            if loop is not None:
                loop.call_soon_threadsafe(self._hand_over)
        except RuntimeError:  # the loop closed (the server stopped past its grace): nobody waits for it
            pass

    def _hand_over(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        for events, event in batch:
            events.put_nowait(event)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()
_mailboxes_lock = threading.Lock()


def loop_sink(events: asyncio.Queue) -> Callable[[Event], None]:
    """A sink that hands each event to `events` on the running event loop (the gRPC
    and HTTP servers' handlers), in order, batched with the loop's other events (`_Mailbox`);
    call it on that loop."""
    loop = asyncio.get_running_loop()
    with _mailboxes_lock:
        mailbox = _mailboxes.get(loop)
        if mailbox is None:
            mailbox = _mailboxes[loop] = _Mailbox(loop)

    def sink(event: Event) -> None:
        mailbox.post(events, event)

    return sink


class EventQueue:
    """A blocking sink for threads (a trainer's rollouts, tests)."""

    def __init__(self) -> None:
        self._q: queue.Queue[Event] = queue.Queue()

    def __call__(self, event: Event) -> None:
        self._q.put(event)

    def events(self, request: GenRequest) -> Iterator[Event]:
        """Yield events until Finished/Failed; a deadline turns into a Failed."""
        while True:
            timeout = None if request.deadline is None else max(0.0, request.deadline - time.monotonic()) + 1.0
            try:
                event = self._q.get(timeout=timeout)
            except queue.Empty:
                request.cancel()
                yield Failed(StatusError(Status.DEADLINE_EXCEEDED, "deadline exceeded while generating"))
                return
            yield event
            if isinstance(event, (Finished, Failed)):
                return
