"""Dataset snapshots: the immutable, versioned training sets that the dataset
builder writes and the trainers read.

Layout under RLHF_DATASET_DIR:

    <snapshot_id>/manifest.json
    <snapshot_id>/<split>/<kind>.jsonl      split: train | validation | test
                                            kind:  a key of services.common.feedback.KINDS

Record shapes (JSON, one per line; built by services.common.feedback.record_of):
    prompts:        {event_id, prompt_id, user_id, text, source}
    demonstrations: {event_id, prompt_id, user_id, labeler_id, prompt_text, response}
    comparisons:    {event_id, prompt_id, user_id, labeler_id, prompt_text, task_id,
                     responses: [{text, policy_version, rank, sample_id, likert, flags}]}
                    rank 1 = best, equal = tie; likert 1..7 (0 = not given); task_id and
                    sample_id name the LabelingService task ("" for other sources)
    labels:         {event_id, prompt_id, user_id, labeler_id, prompt_text, response,
                     policy_version, likert, flags}

`prompt_text` is the user's raw prompt; trainers render it with the chat
template. `user_id` is the prompt's author, the key of the train/validation/
test split.

The manifest holds the snapshot id, its parent, counts per split and kind,
the source offsets it covers, the rules applied and a content hash.
A snapshot is written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from services.common import feedback

SPLITS = ("train", "validation", "test")
KINDS = tuple(feedback.KINDS)  # one records file per kind of feedback
MANIFEST = "manifest.json"


class SnapshotError(Exception):
    pass


def count_by_policy_version(comparisons: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """{policy version: comparisons with at least one response it produced} (a mixed comparison counts for each).

    The RM trainer writes it into its manifest; lineage reads it from there."""
    counts: Counter[str] = Counter()
    for c in comparisons:
        for version in {r.get("policy_version") or "unknown" for r in c.get("responses", ())}:
            counts[version] += 1
    return dict(sorted(counts.items()))


def _canonical(record: Mapping[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def content_hash(data: Mapping[str, Mapping[str, Iterable[Mapping[str, Any]]]]) -> str:
    digest = hashlib.sha256()
    for split in SPLITS:
        for kind in KINDS:
            for record in data.get(split, {}).get(kind, []):
                digest.update(f"{split}/{kind}:".encode())
                digest.update(_canonical(record).encode())
                digest.update(b"\n")
    return digest.hexdigest()


class SnapshotStore:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def write(
        self,
        data: Mapping[str, Mapping[str, list[Mapping[str, Any]]]],
        *,
        source_offsets: Mapping[str, Any] | None = None,
        parent: str = "",
        rules: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        snapshot_id: str | None = None,
    ) -> dict[str, Any]:
        """Write {split: {kind: [records]}} atomically; return the manifest.

        The id defaults to one derived from the content hash, so writing the
        same content twice gives the same id (and the second write is a no-op).
        """
        for split in data:
            if split not in SPLITS:
                raise SnapshotError(f"unknown split {split!r}")
            for kind in data[split]:
                if kind not in KINDS:
                    raise SnapshotError(f"unknown record kind {kind!r}")
        digest = content_hash(data)
        snapshot_id = snapshot_id or f"ds-{digest[:16]}"
        target = self.root / snapshot_id
        if (target / MANIFEST).exists():
            return self.manifest(snapshot_id)
        manifest = {
            "snapshot_id": snapshot_id,
            "parent": parent,
            "created_unix_ms": int(time.time() * 1000),
            "content_sha256": digest,
            "counts": {s: {k: len(data.get(s, {}).get(k, [])) for k in KINDS} for s in SPLITS},
            "source_offsets": dict(source_offsets or {}),
            "rules": dict(rules or {}),
            **dict(extra or {}),
        }
        tmp = self.root / f".{snapshot_id}.{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            for split in SPLITS:
                (tmp / split).mkdir()
                for kind in KINDS:
                    with open(tmp / split / f"{kind}.jsonl", "w") as fh:
                        for record in data.get(split, {}).get(kind, []):
                            fh.write(_canonical(record) + "\n")
                        fh.flush()
                        os.fsync(fh.fileno())
            with open(tmp / MANIFEST, "w") as fh:
                fh.write(json.dumps(manifest, indent=2, sort_keys=True))
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(tmp, target)
        except OSError:
            if (target / MANIFEST).exists():  # a concurrent writer won; same content
                shutil.rmtree(tmp, ignore_errors=True)
                return self.manifest(snapshot_id)
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return manifest

    def manifest(self, snapshot_id: str) -> dict[str, Any]:
        path = self.root / snapshot_id / MANIFEST
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise SnapshotError(f"dataset snapshot {snapshot_id!r} not found in {self.root}") from None

    def read(self, snapshot_id: str, split: str, kind: str) -> list[dict[str, Any]]:
        if split not in SPLITS or kind not in KINDS:
            raise SnapshotError(f"unknown split/kind {split}/{kind}")
        self.manifest(snapshot_id)
        path = self.root / snapshot_id / split / f"{kind}.jsonl"
        with open(path) as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def list(self) -> list[dict[str, Any]]:
        out = []
        for entry in self.root.iterdir():
            if not entry.name.startswith(".") and (entry / MANIFEST).exists():
                out.append(self.manifest(entry.name))
        return sorted(out, key=lambda m: (m["created_unix_ms"], m["snapshot_id"]))

    def latest(self) -> str | None:
        snapshots = self.list()
        return snapshots[-1]["snapshot_id"] if snapshots else None
