"""The dataset builder: consumes the feedback topics and writes immutable,
cumulative dataset snapshots (services.common.datasets.SnapshotStore).

One build:
  1. reads every partition of the feedback topics (one per kind of
     services.common.feedback.KINDS) from the group's committed offsets up to
     the end offsets seen at start;
  2. decodes and checks each record (the kind's event check, from the same
     table); a malformed one goes to the dead-letter topic with its reason
     (acknowledged before anything is committed);
  3. adds new records to the group's accumulated state, de-duplicated by
     event id (a retried request, or a re-read after a crash, adds nothing);
  4. applies the data rules (rules.py) to everything accumulated and writes
     the snapshot, then the state, durably;
  5. only then commits the offsets to the consumer group.

A crash anywhere before step 5 re-reads the same records on the next build;
de-duplication by event id makes that re-read produce the same snapshot (its
id is a hash of its content).

The builder assigns itself every partition rather than joining the group
(the group still stores its offsets): the rules are global per user (cap,
split), so one builder must see all partitions, and a group rebalance would
only hand parts of the data to parts of the builders. A file lock keeps two
builders of one group from running at once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from rlhf.v1 import events_pb2

from services.common import bus
from services.common.config import Settings
from services.common.datasets import KINDS, SnapshotStore
from services.common.feedback import InvalidField, Limits, check_event, record_of
from services.common.logs import get_logger, log_fields
from services.datasets.rules import RuleParams, apply_rules

log = get_logger(__name__)

STATE_DIR = ".builder"  # hidden: SnapshotStore.list() skips dot-folders


class BuildError(RuntimeError):
    pass


@dataclass
class BuilderState:
    """What one consumer group has accumulated: records by kind and event id,
    the next offset per partition, and the dead-lettered positions."""

    offsets: dict[str, dict[str, int]] = field(default_factory=dict)
    events: dict[str, dict[str, dict[str, Any]]] = field(default_factory=lambda: {k: {} for k in KINDS})
    deadlettered: list[str] = field(default_factory=list)
    snapshot_id: str = ""

    @classmethod
    def load(cls, path: Path) -> BuilderState:
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        state = cls(data["offsets"], data["events"], data["deadlettered"], data["snapshot_id"])
        for kind in KINDS:
            state.events.setdefault(kind, {})
        return state

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(
                {
                    "offsets": self.offsets,
                    "events": self.events,
                    "deadlettered": self.deadlettered,
                    "snapshot_id": self.snapshot_id,
                },
                fh,
            )
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def state_path(settings: Settings, group_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", group_id)
    return Path(settings.dataset_dir) / STATE_DIR / f"{safe}.json"


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BuildError(f"another builder of this group holds {path.with_suffix('.lock')}") from None
        yield


@dataclass
class _Reader:
    """Reads the feedback topics into the state; sends malformed records to the dead-letter topic."""

    settings: Settings
    state: BuilderState
    limits: Limits
    topics: bus.Topics
    producer: Any = None
    read: int = 0
    added: int = 0
    duplicates: int = 0
    dead: int = 0

    def handle(self, kind: str, record) -> None:
        self.read += 1
        try:
            event = bus.decode(kind, record.value)
            check_event(kind, event, self.limits)
        except DecodeError as err:
            return self._dead_letter(record, f"undecodable {bus.TOPIC_TYPES[kind].DESCRIPTOR.full_name}: {err}")
        except InvalidField as err:
            return self._dead_letter(record, f"invalid {kind} event: {err}")
        known = self.state.events[kind]
        if event.event_id in known:
            self.duplicates += 1  # a retry or a re-read: the first copy stays
            return
        known[event.event_id] = record_of(kind, event)
        self.added += 1

    def _dead_letter(self, record, reason: str) -> None:
        position = f"{record.topic}:{record.partition}:{record.offset}"
        if position in self.state.deadlettered:
            return  # sent before a crash that came before the commit
        if self.producer is None:
            self.producer = bus.make_producer(self.settings)
        event = events_pb2.DeadLetterEvent(
            source_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            reason=reason,
            payload=record.value or b"",
            created_unix_ms=int(time.time() * 1000),
        )
        bus.publish(self.producer, self.topics, "deadletter", record.key or b"", event, self.settings.kafka_timeout_s)
        self.state.deadlettered.append(position)
        self.dead += 1
        log_fields(
            log,
            logging.WARNING,
            "record sent to the dead-letter topic",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            reason=reason,
        )

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close(timeout=5)


def build_snapshot(
    settings: Settings,
    group_id: str | None = None,
    timeout: float = 120.0,
    before_commit: Callable[[str], None] | None = None,
) -> str:
    """Consume what is new for `group_id`, write the cumulative snapshot, commit; return its id.

    `before_commit(snapshot_id)` runs after the snapshot and state are durable
    and before the offsets are committed (crash tests hook in there).
    """
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    group_id = group_id or settings.dataset_group
    path = state_path(settings, group_id)
    topics = bus.Topics.from_settings(settings)
    with _exclusive(path):
        state = BuilderState.load(path)
        bus.create_topics(settings)
        consumer = bus.make_consumer(
            settings, group_id, request_timeout_ms=int(max(settings.kafka_timeout_s, 5) * 1000) + 1000
        )
        reader = _Reader(settings, state, Limits.from_settings(settings), topics)
        try:
            kind_of: dict[str, str] = {}
            partitions = []
            for kind in KINDS:
                name = topics.name(kind)
                kind_of[name] = kind
                found = consumer.partitions_for_topic(name) or set()
                partitions += [TopicPartition(name, p) for p in sorted(found)]
            if not partitions:
                raise BuildError("the feedback topics have no partitions (is the broker reachable?)")
            consumer.assign(partitions)
            for tp in partitions:
                # Resume from the committed offset, but never past what the
                # state holds (a lost state file means: read everything again).
                committed = consumer.committed(tp) or 0
                held = state.offsets.get(tp.topic, {}).get(str(tp.partition), 0)
                consumer.seek(tp, min(committed, held))
            end = consumer.end_offsets(partitions)
            deadline = time.monotonic() + timeout
            caught_up = False
            while time.monotonic() < deadline:
                if all(consumer.position(tp) >= end[tp] for tp in partitions):
                    caught_up = True
                    break
                for tp, records in consumer.poll(timeout_ms=500, max_records=5000).items():
                    for record in records:
                        reader.handle(kind_of[tp.topic], record)
            if not caught_up:
                log_fields(
                    log,
                    logging.WARNING,
                    "build timed out before reaching the end offsets; snapshot covers what was read",
                    timeout_s=timeout,
                )
            positions = {tp: consumer.position(tp) for tp in partitions}
            for tp, offset in positions.items():
                state.offsets.setdefault(tp.topic, {})[str(tp.partition)] = offset

            params = RuleParams.from_settings(settings)
            data, report = apply_rules({kind: state.events[kind].values() for kind in KINDS}, params)
            manifest = SnapshotStore(settings.dataset_dir).write(
                data,
                source_offsets=state.offsets,
                parent=state.snapshot_id if state.snapshot_id else "",
                rules=report,
                extra={"group": group_id, "caught_up": caught_up, "topic_prefix": settings.topic_prefix},
            )
            snapshot_id = manifest["snapshot_id"]
            state.snapshot_id = snapshot_id
            state.save(path)
            if before_commit:
                before_commit(snapshot_id)
            consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in positions.items()})
            log_fields(
                log,
                logging.INFO,
                "dataset snapshot built",
                snapshot=snapshot_id,
                group=group_id,
                read=reader.read,
                added=reader.added,
                duplicates=reader.duplicates,
                dead_lettered=reader.dead,
                counts=manifest["counts"],
            )
            return snapshot_id
        finally:
            reader.close()
            consumer.close()
