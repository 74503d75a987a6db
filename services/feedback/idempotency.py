"""Remembers recent requests by event id so a retry returns the first reply
and writes nothing.

Each key has one owner: the first call to `reserve` a key publishes the event
and then `complete`s (or `fail`s) it; concurrent retries wait for that outcome
instead of publishing a second record. A failed publish forgets the key, so a
later retry tries again (the record may still land: the dataset builder
de-duplicates by event id). Completed entries are evicted oldest first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from rlhf.v1 import feedback_pb2


@dataclass
class Entry:
    fingerprint: str
    done: threading.Event = field(default_factory=threading.Event)
    reply: feedback_pb2.SubmitReply | None = None
    error: Exception | None = None

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
        self._entries: OrderedDict[str, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def reserve(self, key: str, fingerprint: str) -> tuple[Entry, bool]:
        """(entry, True) if the caller now owns `key`; (existing entry, False) if not."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry, False
            entry = self._entries[key] = Entry(fingerprint)
            self._evict()
            return entry, True

    def complete(self, key: str, entry: Entry, reply: feedback_pb2.SubmitReply) -> None:
        entry.reply = reply
        entry.done.set()

    def fail(self, key: str, entry: Entry, error: Exception) -> None:
        with self._lock:
            if self._entries.get(key) is entry:
                del self._entries[key]
        entry.error = error
        entry.done.set()

    def _evict(self) -> None:
        # In-flight entries are never evicted: their retries must keep waiting on them.
        for _ in range(len(self._entries)):
            if len(self._entries) <= self.capacity:
                return
            key, entry = next(iter(self._entries.items()))
            if entry.done.is_set():
                del self._entries[key]
            else:
                self._entries.move_to_end(key)
