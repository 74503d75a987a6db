"""Remembers recent requests by event id so a retry returns the first reply
and writes nothing.

Each key has one owner: the first call to `reserve` a key publishes the event.
The outcome belongs to the write, not to the call that started it: the
server settles the entry when the broker acknowledges the record (`complete`)
or refuses it (`fail`), even when the calling client already gave up (a
short deadline, a dropped connection). So a retry after a client deadline
waits for that write and returns its reply; a retry after a failed write
takes the key over and publishes again (the first record may still land
late: the dataset builder de-duplicates by event id).

Memory is bounded: completed requests are kept as (fingerprint, serialised
reply) tuples, evicted oldest first beyond `capacity`, so the garbage
collector does not have to walk them and a cache of 100k entries costs no GC
pauses on the request path; an in-flight entry lives at most as long as its
write, which the server bounds by the broker timeout.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict

from rlhf.v1 import feedback_pb2


class Entry:
    __slots__ = ("fingerprint", "reply", "error", "done", "_waiters")

    def __init__(self, fingerprint: str, reply: feedback_pb2.SubmitReply | None = None):
        self.fingerprint = fingerprint
        self.reply = reply
        self.error: Exception | None = None
        self.done = threading.Event()
        self._waiters: list[asyncio.Future] = []
        if reply is not None:
            self.done.set()

    def _settle(self) -> None:
        """Mark the outcome known and wake every asyncio waiter (from any thread)."""
        self.done.set()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.get_loop().call_soon_threadsafe(_wake, waiter)

    def _outcome(self) -> feedback_pb2.SubmitReply:
        if self.error is not None:
            raise self.error
        assert self.reply is not None
        reply = feedback_pb2.SubmitReply()
        reply.CopyFrom(self.reply)
        reply.duplicate = True
        return reply

    def wait(self, timeout: float) -> feedback_pb2.SubmitReply:
        """The owner's reply (as a duplicate); raise its error or TimeoutError."""
        if not self.done.wait(timeout):
            raise TimeoutError("the first request with this request_id is still waiting for the broker")
        return self._outcome()

    async def wait_async(self, timeout: float) -> feedback_pb2.SubmitReply:
        """As `wait`, on an event loop, without holding a thread."""
        if not self.done.is_set():
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            if self.done.is_set():  # settled while we registered
                waiter.set_result(None)
            try:
                async with asyncio.timeout(timeout):
                    await waiter
            except TimeoutError:
                raise TimeoutError("the first request with this request_id is still waiting for the broker") from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        return self._outcome()


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class IdempotencyCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._inflight: dict[str, Entry] = {}
        self._completed: OrderedDict[str, tuple[str, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._inflight) + len(self._completed)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def reserve(self, key: str, fingerprint: str) -> tuple[Entry, bool]:
        """(entry, True) if the caller now owns `key`; (existing entry, False) if not."""
        with self._lock:
            done = self._completed.get(key)
            if done is not None:
                self._completed.move_to_end(key)
                return Entry(done[0], feedback_pb2.SubmitReply.FromString(done[1])), False
            entry = self._inflight.get(key)
            if entry is not None:
                return entry, False
            entry = self._inflight[key] = Entry(fingerprint)
            return entry, True

    def complete(self, key: str, entry: Entry, reply: feedback_pb2.SubmitReply) -> None:
        """The write of `entry` was acknowledged: remember its reply.

        A late ack of a write that was already failed (and perhaps taken
        over) still wins: the record is on the topic, so later retries get
        its reply."""
        with self._lock:
            if self._inflight.get(key) is entry:
                del self._inflight[key]
            self._completed[key] = (entry.fingerprint, reply.SerializeToString())
            self._completed.move_to_end(key)
            while len(self._completed) > self.capacity:
                self._completed.popitem(last=False)
        if not entry.done.is_set():
            entry.reply = reply
            entry._settle()

    def fail(self, key: str, entry: Entry, error: Exception) -> None:
        """The write of `entry` failed (or timed out): forget the key so a retry publishes again."""
        with self._lock:
            if self._inflight.get(key) is entry:
                del self._inflight[key]
        if not entry.done.is_set():
            entry.error = error
            entry._settle()
