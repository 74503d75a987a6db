"""The labeling queue's state in SQLite (WAL, synchronous=FULL), under
$RLHF_HOME/labeling/queue.db: accepted prompts, tasks with their samples and
producing versions, leases, submissions and per-sample judgements.

Every change is one transaction, so a process killed at any point (SIGKILL
included) restarts with a consistent queue: a lease granted is still held, a
submission recorded stays recorded, and the prompts topic resumes from the
offsets committed with the prompts they produced. What a labeler has seen is
the assignments table itself: (task, labeler) is its key and a task is one
prompt, so nobody is ever given the same prompt twice.

Tasks that were still generating samples when the process died are undone on
open (their prompt goes back to the queue); nothing was shown or written for
them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS offsets (part INTEGER PRIMARY KEY, next INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, accepted INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS prompts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt_id TEXT UNIQUE NOT NULL,
    user_id TEXT NOT NULL,
    split TEXT NOT NULL,
    text TEXT NOT NULL,
    dedup_key TEXT UNIQUE NOT NULL,
    used INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS prompts_free ON prompts (split, used, seq);
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT UNIQUE NOT NULL,
    prompt_id TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,                 -- demonstration | comparison
    split TEXT NOT NULL,
    target INTEGER NOT NULL,            -- labelers wanted (overlap: 2 or more)
    state TEXT NOT NULL,                -- generating | ready
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    sample_id TEXT PRIMARY KEY,
    task_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    text TEXT NOT NULL,
    policy_version TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_task ON samples (task_id, idx);
CREATE TABLE IF NOT EXISTS assignments (
    task_id TEXT NOT NULL,
    labeler_id TEXT NOT NULL,
    state TEXT NOT NULL,                -- leased | submitted
    leased_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    submitted_ms INTEGER,
    event_id TEXT,
    PRIMARY KEY (task_id, labeler_id)
);
CREATE INDEX IF NOT EXISTS assignments_labeler ON assignments (labeler_id, state);
CREATE TABLE IF NOT EXISTS judgements (
    task_id TEXT NOT NULL,
    labeler_id TEXT NOT NULL,
    sample_id TEXT NOT NULL,
    likert INTEGER NOT NULL,
    flags TEXT NOT NULL,                -- JSON list of flag names
    rank INTEGER NOT NULL,
    PRIMARY KEY (task_id, labeler_id, sample_id)
);
"""


@dataclass(frozen=True)
class Sample:
    sample_id: str
    text: str
    policy_version: str


@dataclass
class TaskRow:
    task_id: str
    prompt_id: str
    prompt_text: str
    kind: str
    split: str
    target: int
    state: str
    samples: list[Sample] = field(default_factory=list)
    expires_ms: int = 0  # the caller's lease


@dataclass(frozen=True)
class Assignment:
    state: str
    expires_ms: int
    event_id: str


@dataclass(frozen=True)
class Policy:
    """How new tasks are made: shares of kinds, overlap and splits."""

    demonstration_share: float
    overlap_share: float
    overlap_labelers: int
    split_shares: Mapping[str, float]


def new_task_id() -> str:
    """Random, and stored: a rebuilt queue never reuses an id (request ids derive from it)."""
    return "task-" + uuid.uuid4().hex[:20]


class LabelingStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # One connection, one lock: every transaction is short (no I/O to other
        # services inside one), so serialising them costs little.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._undo_unfinished()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _undo_unfinished(self) -> None:
        with self.tx() as db:
            for (task_id,) in db.execute("SELECT task_id FROM tasks WHERE state = 'generating'").fetchall():
                self._drop_task(db, task_id)

    @staticmethod
    def _drop_task(db: sqlite3.Connection, task_id: str) -> None:
        db.execute(
            "UPDATE prompts SET used = 0 WHERE prompt_id = (SELECT prompt_id FROM tasks WHERE task_id = ?)", (task_id,)
        )
        for table in ("assignments", "samples", "tasks"):
            db.execute(f"DELETE FROM {table} WHERE task_id = ?", (task_id,))

    # --- prompts in -------------------------------------------------------------------
    def offsets(self) -> dict[int, int]:
        with self._lock:
            return dict(self._db.execute("SELECT part, next FROM offsets").fetchall())

    def add_prompts(
        self, prompts: Iterable[tuple[str, str, str, str, str]], offsets: Mapping[int, int], max_per_user: int
    ) -> int:
        """Accept (prompt_id, user_id, split, text, dedup_key) rows that pass the
        per-user cap and prefix de-duplication; commit the topic offsets with them."""
        accepted = 0
        with self.tx() as db:
            for prompt_id, user_id, split, text, key in prompts:
                row = db.execute("SELECT accepted FROM users WHERE user_id = ?", (user_id,)).fetchone()
                if row and row[0] >= max_per_user:
                    continue
                cursor = db.execute(
                    "INSERT OR IGNORE INTO prompts (prompt_id, user_id, split, text, dedup_key) VALUES (?, ?, ?, ?, ?)",
                    (prompt_id, user_id, split, text, key),
                )
                if cursor.rowcount:
                    accepted += 1
                    db.execute(
                        "INSERT INTO users VALUES (?, 1) ON CONFLICT (user_id) DO UPDATE SET accepted = accepted + 1",
                        (user_id,),
                    )
            db.executemany(
                "INSERT INTO offsets VALUES (?, ?) ON CONFLICT (part) DO UPDATE SET next = excluded.next",
                offsets.items(),
            )
        return accepted

    # --- leases -------------------------------------------------------------------------
    def lease(
        self, labeler_id: str | None, now_ms: int, lease_ms: int, policy: Policy, kind: str = ""
    ) -> tuple[TaskRow | None, bool]:
        """The caller's task: its open lease, else a task that still needs
        labelers, else a new task from the next prompt. Returns (task, new):
        `new` means the task is a comparison whose samples must be generated
        (then `complete` or `abandon` it). labeler_id None makes a task with no
        lease (pre-generation). `kind` (if given) restricts all three to that kind."""
        kinds = (kind,) if kind else ("demonstration", "comparison")
        with self.tx() as db:
            if labeler_id is not None:
                row = db.execute(
                    "SELECT t.task_id, a.expires_ms FROM assignments a JOIN tasks t USING (task_id) "
                    "WHERE a.labeler_id = ? AND a.state = 'leased' AND a.expires_ms > ? AND t.kind IN (?, ?) "
                    "ORDER BY a.leased_ms LIMIT 1",
                    (labeler_id, now_ms, kinds[0], kinds[-1]),
                ).fetchone()
                if row:
                    return self._task(db, row[0], row[1]), False
                row = db.execute(
                    "SELECT t.task_id FROM tasks t WHERE t.state = 'ready' AND t.kind IN (?, ?) "
                    "AND NOT EXISTS (SELECT 1 FROM assignments a WHERE a.task_id = t.task_id AND a.labeler_id = ?) "
                    "AND (SELECT COUNT(*) FROM assignments a WHERE a.task_id = t.task_id "
                    "     AND (a.state = 'submitted' OR a.expires_ms > ?)) < t.target "
                    "ORDER BY t.seq LIMIT 1",
                    (kinds[0], kinds[-1], labeler_id, now_ms),
                ).fetchone()
                if row:
                    self._assign(db, row[0], labeler_id, now_ms, lease_ms)
                    return self._task(db, row[0], now_ms + lease_ms), False
            prompt = self._next_prompt(db, policy)
            if prompt is None:
                return None, False
            prompt_id, split = prompt
            shape, target = self._shape(db, policy)
            kind = kind or shape
            task_id = new_task_id()
            db.execute("UPDATE prompts SET used = 1 WHERE prompt_id = ?", (prompt_id,))
            db.execute(
                "INSERT INTO tasks (task_id, prompt_id, kind, split, target, state, created_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (task_id, prompt_id, kind, split, target, "generating" if kind == "comparison" else "ready", now_ms),
            )
            if labeler_id is not None:
                self._assign(db, task_id, labeler_id, now_ms, lease_ms)
            return self._task(db, task_id, now_ms + lease_ms), kind == "comparison"

    @staticmethod
    def _assign(db, task_id: str, labeler_id: str, now_ms: int, lease_ms: int) -> None:
        db.execute(
            "INSERT INTO assignments (task_id, labeler_id, state, leased_ms, expires_ms) VALUES (?, ?, 'leased', ?, ?)",
            (task_id, labeler_id, now_ms, now_ms + lease_ms),
        )

    @staticmethod
    def _next_prompt(db, policy: Policy) -> tuple[str, str] | None:
        """The oldest free prompt of the split furthest below its share of tasks."""
        made = dict(db.execute("SELECT split, COUNT(*) FROM tasks GROUP BY split").fetchall())
        free = {
            split
            for (split,) in db.execute("SELECT DISTINCT split FROM prompts WHERE used = 0").fetchall()
            if policy.split_shares.get(split, 0) > 0
        }
        if not free:
            return None
        order = list(policy.split_shares)
        split = min(free, key=lambda s: (made.get(s, 0) / policy.split_shares[s], order.index(s)))
        row = db.execute(
            "SELECT prompt_id FROM prompts WHERE split = ? AND used = 0 ORDER BY seq LIMIT 1", (split,)
        ).fetchone()
        return row[0], split

    @staticmethod
    def _shape(db, policy: Policy) -> tuple[str, int]:
        """Kind and labeler count of the next task: each share is met as closely as the count allows."""
        total, demos, overlap = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(kind = 'demonstration'), 0), COALESCE(SUM(target > 1), 0) FROM tasks"
        ).fetchone()
        kind = "demonstration" if (demos + 1) <= policy.demonstration_share * (total + 1) + 1e-9 else "comparison"
        target = policy.overlap_labelers if (overlap + 1) <= policy.overlap_share * (total + 1) + 1e-9 else 1
        return kind, target

    def _task(self, db, task_id: str, expires_ms: int) -> TaskRow:
        t = db.execute(
            "SELECT t.task_id, t.prompt_id, p.text, t.kind, t.split, t.target, t.state "
            "FROM tasks t JOIN prompts p USING (prompt_id) WHERE t.task_id = ?",
            (task_id,),
        ).fetchone()
        samples = [
            Sample(*row)
            for row in db.execute(
                "SELECT sample_id, text, policy_version FROM samples WHERE task_id = ? ORDER BY idx", (task_id,)
            )
        ]
        return TaskRow(*t, samples=samples, expires_ms=expires_ms)

    def complete(self, task_id: str, samples: list[Sample]) -> TaskRow:
        with self.tx() as db:
            db.executemany(
                "INSERT INTO samples VALUES (?, ?, ?, ?, ?)",
                [(s.sample_id, task_id, i, s.text, s.policy_version) for i, s in enumerate(samples)],
            )
            db.execute("UPDATE tasks SET state = 'ready' WHERE task_id = ?", (task_id,))
            return self._task(db, task_id, 0)

    def abandon(self, task_id: str) -> None:
        with self.tx() as db:
            self._drop_task(db, task_id)

    # --- submissions ----------------------------------------------------------------------
    def task(self, task_id: str) -> TaskRow | None:
        with self._lock:
            if not self._db.execute("SELECT 1 FROM tasks WHERE task_id = ?", (task_id,)).fetchone():
                return None
            return self._task(self._db, task_id, 0)

    def assignment(self, task_id: str, labeler_id: str) -> Assignment | None:
        with self._lock:
            row = self._db.execute(
                "SELECT state, expires_ms, COALESCE(event_id, '') FROM assignments "
                "WHERE task_id = ? AND labeler_id = ?",
                (task_id, labeler_id),
            ).fetchone()
        return Assignment(*row) if row else None

    def record_submission(
        self,
        task_id: str,
        labeler_id: str,
        event_id: str,
        now_ms: int,
        judgements: Iterable[tuple[str, int, list[str], int]] = (),
    ) -> None:
        """Close the lease and keep the judgements (sample_id, likert, flag names, rank)."""
        with self.tx() as db:
            db.execute(
                "UPDATE assignments SET state = 'submitted', submitted_ms = ?, event_id = ? "
                "WHERE task_id = ? AND labeler_id = ?",
                (now_ms, event_id, task_id, labeler_id),
            )
            db.executemany(
                "INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?, ?, ?)",
                [(task_id, labeler_id, s, likert, json.dumps(flags), rank) for s, likert, flags, rank in judgements],
            )

    # --- what the statistics need -----------------------------------------------------------
    def rankings(self) -> dict[str, dict[str, dict[str, int]]]:
        """task id -> labeler -> {sample id: rank}, for every submitted comparison."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        with self._lock:
            for task_id, labeler, sample, rank in self._db.execute(
                "SELECT task_id, labeler_id, sample_id, rank FROM judgements"
            ):
                out.setdefault(task_id, {}).setdefault(labeler, {})[sample] = rank
        return out

    def judged_samples(self) -> list[tuple[str, int, list[str]]]:
        """(policy version, likert, flag names) of every judged sample."""
        with self._lock:
            rows = self._db.execute(
                "SELECT s.policy_version, j.likert, j.flags FROM judgements j JOIN samples s USING (sample_id)"
            ).fetchall()
        return [(version, likert, json.loads(flags)) for version, likert, flags in rows]

    def labeler_activity(self) -> list[tuple[str, int, int, int]]:
        """(labeler, submitted, first lease ms, last submission ms)."""
        with self._lock:
            return self._db.execute(
                "SELECT labeler_id, SUM(state = 'submitted'), MIN(leased_ms), COALESCE(MAX(submitted_ms), 0) "
                "FROM assignments GROUP BY labeler_id ORDER BY labeler_id"
            ).fetchall()

    def counts(self, now_ms: int) -> dict[str, object]:
        with self._lock:
            db = self._db
            per_split = dict(
                db.execute(
                    "SELECT t.split, COUNT(*) FROM assignments a JOIN tasks t USING (task_id) "
                    "WHERE a.state = 'submitted' GROUP BY t.split"
                ).fetchall()
            )
            open_leases = db.execute(
                "SELECT COUNT(*) FROM assignments WHERE state = 'leased' AND expires_ms > ?", (now_ms,)
            ).fetchone()[0]
            queued = db.execute("SELECT COUNT(*) FROM prompts WHERE used = 0").fetchone()[0]
        return {"submitted_per_split": per_split, "open_leases": open_leases, "queued_prompts": queued}
