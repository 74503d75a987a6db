"""The checkpoint store: immutable, verified, atomically published checkpoints.

Layout under RLHF_CHECKPOINT_DIR:

    <version>/manifest.json      version, kind, role, parents, dataset snapshot,
                                 hyperparameters, metrics, sha256 per file
    <version>/...                model files
    .staging/<tmp>/              a checkpoint being written (never announced)
    promoted-<role>.json         the version the gate last promoted for a role

A checkpoint is written into .staging, hashed, given its manifest, fsynced,
and renamed into place in one step; only then may it be announced. Readers
call `verify()` before trusting one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
KINDS = {"base": "policy", "sft": "policy", "ppo": "policy", "rm": "reward"}
ROLES = ("policy", "reward")


class CheckpointError(Exception):
    """A checkpoint is missing, corrupt or incompatible."""


@dataclass
class Manifest:
    version: str
    kind: str
    role: str
    parents: list[str] = field(default_factory=list)
    dataset_snapshot: str = ""
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    created_unix_ms: int = 0
    tokenizer_sha256: str = ""
    format: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The store's naming rule: a version is one folder name under the store, made
# of letters, digits, '.', '_' and '-', starting with a letter or digit
# (new_version: `<kind>-<UTC stamp>-<hex>`; seeds: `base-<preset>-seed`).
MAX_VERSION_CHARS = 128
_VERSION_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_VERSION_CHARS - 1}}}")


def new_version(kind: str) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return f"{kind}-{stamp}-{secrets.token_hex(3)}"


def version_name_problem(version: str) -> str | None:
    """Why `version` cannot name a checkpoint (None if it can), decided without
    touching the filesystem, so an edge can refuse it before any lookup. The
    reason shows the name (shortened) but never a server path."""
    if _VERSION_NAME.fullmatch(version):
        return None
    shown = version if len(version) <= 40 else version[:40] + "..."
    if len(version) > MAX_VERSION_CHARS:
        return f"version {shown!r} is {len(version)} characters; the limit is {MAX_VERSION_CHARS}"
    return (
        f"version {shown!r} is not a checkpoint name: use letters, digits, '.', '_' and '-', "
        "starting with a letter or digit"
    )


class CheckpointStore:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / ".staging").mkdir(exist_ok=True)

    # --- writing -----------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, kind: str, **manifest_fields: Any) -> Iterator[tuple[Path, Manifest]]:
        """Yield (folder, manifest) to fill; on success publish atomically.

        Fill the folder with model files and `manifest.metrics` etc.; when
        the block ends without error, files are hashed, the manifest written
        and the folder renamed to its version. On error nothing is published.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {sorted(KINDS)}")
        version = manifest_fields.pop("version", None) or new_version(kind)
        if (self.root / version).exists():
            raise CheckpointError(f"checkpoint {version} already exists; checkpoints are immutable")
        tmp = self.root / ".staging" / f"{version}.{secrets.token_hex(4)}"
        tmp.mkdir(parents=True)
        manifest = Manifest(version=version, kind=kind, role=KINDS[kind], **manifest_fields)
        try:
            yield tmp, manifest
            self._seal(tmp, manifest)
            os.rename(tmp, self.root / version)
            _fsync_dir(self.root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _seal(self, folder: Path, manifest: Manifest) -> None:
        files = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            if rel == MANIFEST:
                continue
            files[rel] = sha256_file(path)
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        if not files:
            raise CheckpointError("refusing to publish an empty checkpoint")
        manifest.files = files
        manifest.tokenizer_sha256 = files.get("tokenizer.json", "")
        manifest.created_unix_ms = manifest.created_unix_ms or int(time.time() * 1000)
        with open(folder / MANIFEST, "w") as fh:
            fh.write(manifest.to_json())
            fh.flush()
            os.fsync(fh.fileno())

    def import_dir(self, source: Path, kind: str, **manifest_fields: Any) -> Manifest:
        """Publish a copy of an existing model folder (e.g. a preset) as a checkpoint."""
        with self.stage(kind, **manifest_fields) as (folder, manifest):
            for path in Path(source).iterdir():
                if path.is_file() and path.name != MANIFEST:
                    shutil.copy2(path, folder / path.name)
        return manifest

    # --- reading -----------------------------------------------------------
    def path(self, version: str) -> Path:
        problem = version_name_problem(version)
        if problem:
            raise CheckpointError(problem)
        return self.root / version

    def exists(self, version: str) -> bool:
        try:
            return (self.path(version) / MANIFEST).exists()
        except CheckpointError:
            return False

    def manifest(self, version: str) -> Manifest:
        path = self.path(version) / MANIFEST
        try:
            return Manifest.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {version} not found in the checkpoint store") from None
        except (json.JSONDecodeError, TypeError) as err:
            raise CheckpointError(f"checkpoint {version}: unreadable manifest ({err})") from None

    def manifest_sha256(self, version: str) -> str:
        return sha256_file(self.path(version) / MANIFEST)

    def verify(self, version: str) -> Manifest:
        """Check every file against the manifest's sha256; raise CheckpointError."""
        manifest = self.manifest(version)
        folder = self.path(version)
        for rel, expected in manifest.files.items():
            path = folder / rel
            if not path.is_file():
                raise CheckpointError(f"checkpoint {version}: file {rel} is missing")
            actual = sha256_file(path)
            if actual != expected:
                raise CheckpointError(
                    f"checkpoint {version}: sha256 mismatch for {rel} (manifest {expected[:12]}, file {actual[:12]})"
                )
        return manifest

    def list(self, role: str | None = None, kind: str | None = None) -> list[Manifest]:
        out = []
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or not (entry / MANIFEST).exists():
                continue
            try:
                m = self.manifest(entry.name)
            except CheckpointError:
                continue
            if (role is None or m.role == role) and (kind is None or m.kind == kind):
                out.append(m)
        return sorted(out, key=lambda m: (m.created_unix_ms, m.version))

    # --- promotion pointer -------------------------------------------------
    def set_promoted(self, role: str, version: str, reason: str = "") -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        manifest = self.manifest(version)
        if manifest.role != role:
            raise CheckpointError(f"checkpoint {version} is a {manifest.role} checkpoint, not {role}")
        pointer = self.root / f"promoted-{role}.json"
        tmp = pointer.with_suffix(f".tmp{secrets.token_hex(3)}")
        tmp.write_text(json.dumps({"version": version, "reason": reason, "at_unix_ms": int(time.time() * 1000)}))
        os.replace(tmp, pointer)

    def promoted(self, role: str) -> str | None:
        pointer = self.root / f"promoted-{role}.json"
        try:
            return json.loads(pointer.read_text())["version"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None
