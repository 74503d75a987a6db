"""Remembers recent requests by event id so a retry returns the first reply
and writes nothing.

Each key has one owner: the first call to `reserve` a key publishes the event
and then `complete`s (or `fail`s) it; concurrent retries wait for that outcome
instead of publishing a second record. A failed publish forgets the key, so a
later retry tries again (the record may still land: the dataset builder
de-duplicates by event id).

Completed requests are kept as (fingerprint, serialised reply) tuples, evicted
oldest first: the garbage collector does not have to walk them, so a cache
of 100k entries costs no GC pauses on the request path.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from rlhf.v1 import feedback_pb2


class Entry:
    __slots__ = ("fingerprint", "reply", "error", "done")

    def __init__(self, fingerprint: str, reply: feedback_pb2.SubmitReply | None = None):
        self.fingerprint = fingerprint
        self.reply = reply
        self.error: Exception | None = None
        self.done = threading.Event()
        if reply is not None:
            self.done.set()

    def wait(self, timeout: float) -> feedback_pb2.SubmitReply:
        """The owner's reply (as a duplicate); raise its error or TimeoutError."""
        if not self.done.wait(timeout):
            raise TimeoutError("the first request with this request_id is still waiting for the broker")
        if self.error is not None:
            raise self.error
        assert self.reply is not None
        reply = feedback_pb2.SubmitReply()
        reply.CopyFrom(self.reply)
        reply.duplicate = True
        return reply


class IdempotencyCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._inflight: dict[str, Entry] = {}
        self._completed: OrderedDict[str, tuple[str, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._inflight) + len(self._completed)

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
        entry.reply = reply
        entry.done.set()
        with self._lock:
            if self._inflight.get(key) is entry:
                del self._inflight[key]
            self._completed[key] = (entry.fingerprint, reply.SerializeToString())
            while len(self._completed) > self.capacity:
                self._completed.popitem(last=False)

    def fail(self, key: str, entry: Entry, error: Exception) -> None:
        with self._lock:
            if self._inflight.get(key) is entry:
                del self._inflight[key]
        entry.error = error
        entry.done.set()
