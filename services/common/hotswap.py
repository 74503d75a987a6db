"""Zero-downtime checkpoint hot-swap, shared by the policy and reward services.

A `ModelSwitcher` owns "the version this service serves now". It follows the
checkpoints topic (`bus.CheckpointFollower`) and, on a TYPE_PROMOTED event
for its role, prepares the new version in a background thread:

  1. verify every file's sha256 against the manifest (`CheckpointStore.verify`),
  2. check it is compatible: same role, and the same tokenizer (vocabulary,
     special tokens, chat template) as the version now serving, since clients,
     datasets and the other service all depend on token ids,
  3. load it and warm it up (one small forward pass),
  4. switch: one reference assignment under a lock, then `on_switch(new)`.

Requests that already hold the old `Loaded` finish on it; every response
names the version it was produced by. A version that fails any step is
rejected with a logged reason (and remembered, so it is not retried) while
the old version keeps serving.

An admin may pin a version (roll back or forward); while pinned, promotions
are recorded but not followed. Unpinning goes back to the promoted version.
As a safety net for a lost announcement (the embedded broker keeps events in
memory only), the worker also re-reads the store's promoted pointer every
`poll_s` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.v1 import events_pb2

from services.common import openmp
from services.common.bootstrap import ensure_seeded
from services.common.bus import CheckpointFollower
from services.common.checkpoints import CheckpointError, CheckpointStore, Manifest
from services.common.config import Settings
from services.common.errors import Status, StatusError
from services.common.logs import get_logger, log_fields
from services.common.metrics import SERVING_VERSION, SWAPS
from services.common.models import load_tokenizer

log = get_logger(__name__)


@dataclass(frozen=True)
class Loaded:
    """A verified, loaded, warmed-up checkpoint."""

    version: str
    manifest: Manifest
    path: Path
    model: Any
    tokenizer: Any

    @property
    def kind(self) -> str:
        return self.manifest.kind


def tokenizer_mismatch(new, old) -> str | None:
    """Why `new` cannot replace `old`, or None if they encode text identically."""
    if new.get_vocab() != old.get_vocab():
        return "tokenizer vocabulary differs from the serving version's"
    for attr in ("eos_token_id", "pad_token_id", "chat_template"):
        if getattr(new, attr, None) != getattr(old, attr, None):
            return f"tokenizer {attr} differs from the serving version's"
    return None


class ModelSwitcher:
    def __init__(
        self,
        settings: Settings,
        role: str,
        service: str,
        load_model: Callable[[Path, Manifest], Any],
        warmup: Callable[[Loaded], None] = lambda loaded: None,
        on_switch: Callable[[Loaded], None] = lambda loaded: None,
        poll_s: float = 10.0,
    ):
        self.settings = settings
        self.role = role
        self.service = service
        self.store = CheckpointStore(settings.checkpoint_dir)
        self._load_model = load_model
        self._warmup = warmup
        self._on_switch = on_switch
        self.poll_s = poll_s
        self._current: Loaded | None = None
        self._pinned: str | None = None
        self.rejected: dict[str, str] = {}  # version -> reason
        self._swap_lock = threading.Lock()  # one prepare+switch at a time
        self._cv = threading.Condition()
        self._wanted: str | None = None
        self._stopping = False
        self._follower = None
        self._worker: threading.Thread | None = None

    # --- state ----------------------------------------------------------------
    @property
    def current(self) -> Loaded:
        loaded = self._current
        if loaded is None:
            raise StatusError(Status.UNAVAILABLE, f"{self.service} has no model loaded yet")
        return loaded

    @property
    def pinned(self) -> str:
        return self._pinned or ""

    @property
    def following(self) -> bool:
        """True once the follower reads the checkpoints topic (announcements from now on are seen)."""
        return self._follower is not None and self._follower.ready

    def available_versions(self) -> list[str]:
        return [m.version for m in self.store.list(role=self.role)]

    # --- lifecycle --------------------------------------------------------------
    def start(self, follow: bool = True, follow_wait: float | None = None) -> Loaded:
        """Load the first version (RLHF_SERVE_VERSION, else promoted, else the seed)
        synchronously, then follow announcements in the background."""
        # Seeded and loaded on a side thread: the compute thread (engine, scorer) is the
        # process's one OpenMP pool (services/common/openmp.py).
        self._switch(openmp.on_side_thread(self._prepare_first, f"{self.service}-load"))
        self._worker = threading.Thread(target=self._work, name=f"{self.service}-hotswap", daemon=True)
        self._worker.start()
        if follow:
            self._follower = CheckpointFollower(self.settings, self.role, self._on_event)
            # Wait for the follower so no announcement is missed, but not forever when the
            # broker is down: the promoted-pointer poll covers that gap.
            self._follower.start(
                wait=follow_wait if follow_wait is not None else min(15.0, 2 * self.settings.kafka_timeout_s)
            )
            log_fields(
                log,
                logging.INFO,
                "following checkpoint announcements",
                service=self.service,
                role=self.role,
                ready=self.following,
            )
        return self.current

    def _prepare_first(self) -> Loaded:
        if self.settings.serve_version:
            version = self.settings.serve_version
            self._pinned = version
        else:
            version = self.store.promoted(self.role)
            if not version or not self.store.exists(version):
                version = ensure_seeded(self.settings, self.store)[self.role]
        return self._prepare(version)

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._follower is not None:
            self._follower.stop()
        if self._worker is not None:
            self._worker.join(timeout=10)

    # --- following promotions ----------------------------------------------------
    def _on_event(self, event: events_pb2.CheckpointEvent) -> None:
        if event.type != events_pb2.CheckpointEvent.TYPE_PROMOTED:
            return
        log_fields(
            log, logging.INFO, "promotion announced", service=self.service, version=event.version, pinned=self.pinned
        )
        self.request(event.version)

    def request(self, version: str) -> None:
        """Ask the background worker to move to `version` (the newest request wins)."""
        with self._cv:
            self._wanted = version
            self._cv.notify_all()

    def _work(self) -> None:
        openmp.side_thread()  # loads run on one intra-op thread (services/common/openmp.py)
        next_poll = time.monotonic() + self.poll_s
        while True:
            with self._cv:
                while self._wanted is None and not self._stopping:
                    remaining = next_poll - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cv.wait(remaining)
                if self._stopping:
                    return
                wanted, self._wanted = self._wanted, None
            if wanted is None:  # poll the promoted pointer in case an announcement was lost
                next_poll = time.monotonic() + self.poll_s
                wanted = self.store.promoted(self.role)
            if wanted:
                self._try_follow(wanted)

    def _try_follow(self, version: str) -> None:
        with self._swap_lock:
            if self._pinned is not None:
                return
            if self._current is not None and self._current.version == version:
                return
            if version in self.rejected:
                return
            try:
                loaded = self._prepare(version)
            except Exception as err:  # noqa: BLE001 - any failure rejects the version; the old one keeps serving
                self._reject(version, str(err))
                return
            if self._pinned is None:  # an admin may have pinned while this one loaded
                self._switch(loaded)

    # --- pinning -------------------------------------------------------------
    def pin(self, version: str) -> Loaded:
        """Serve `version` until unpinned; empty `version` unpins and returns to the promoted one."""
        if not version:
            with self._swap_lock:
                self._pinned = None
            promoted = self.store.promoted(self.role)
            log_fields(log, logging.INFO, "unpinned; following promotions", service=self.service, promoted=promoted)
            if promoted:
                self.rejected.pop(promoted, None)  # an explicit unpin deserves a fresh attempt
                self._try_follow(promoted)
            return self.current
        if not self.store.exists(version):
            raise StatusError(Status.INVALID_ARGUMENT, f"version: unknown checkpoint version {version!r}")
        manifest = self.store.manifest(version)
        if manifest.role != self.role:
            raise StatusError(
                Status.INVALID_ARGUMENT,
                f"version: {version} is a {manifest.role} checkpoint; this service serves {self.role} checkpoints",
            )
        with self._swap_lock:
            if self._current is None or self._current.version != version:
                try:
                    loaded = self._prepare(version)
                except Exception as err:  # noqa: BLE001 - as in _work: whatever broke, the old version serves
                    self._reject(version, str(err))
                    raise StatusError(Status.FAILED_PRECONDITION, f"version {version} rejected: {err}") from None
                self._switch(loaded)
            self._pinned = version
        log_fields(log, logging.INFO, "version pinned", service=self.service, version=version)
        return self.current

    # --- the steps ---------------------------------------------------------------
    def _prepare(self, version: str) -> Loaded:
        started = time.monotonic()
        manifest = self.store.verify(version)  # every file's sha256
        if manifest.role != self.role:
            raise CheckpointError(f"checkpoint {version} is a {manifest.role} checkpoint, not {self.role}")
        path = self.store.path(version)
        tokenizer = load_tokenizer(path)
        if self._current is not None:
            why = tokenizer_mismatch(tokenizer, self._current.tokenizer)
            if why:
                raise CheckpointError(f"incompatible checkpoint {version}: {why} ({self._current.version})")
        loaded = Loaded(version, manifest, path, self._load_model(path, manifest), tokenizer)
        self._warmup(loaded)
        log_fields(
            log,
            logging.INFO,
            "checkpoint ready",
            service=self.service,
            version=version,
            kind=manifest.kind,
            load_s=round(time.monotonic() - started, 3),
        )
        return loaded

    def _switch(self, loaded: Loaded) -> None:
        previous = self._current
        self._current = loaded  # atomic: new requests see the new version from here on
        self._on_switch(loaded)
        SERVING_VERSION.labels(self.service).info({"version": loaded.version, "kind": loaded.kind})
        SWAPS.labels(self.service, "switched").inc()
        log_fields(
            log,
            logging.INFO,
            "serving version switched",
            service=self.service,
            version=loaded.version,
            previous=previous.version if previous else None,
        )

    def _reject(self, version: str, reason: str) -> None:
        self.rejected[version] = reason
        SWAPS.labels(self.service, "rejected").inc()
        log_fields(
            log,
            logging.WARNING,
            "checkpoint rejected; keeping the serving version",
            service=self.service,
            version=version,
            reason=reason,
            serving=self._current.version if self._current else None,
        )

    def model_info(self, backend: str = "local") -> dict:
        """The fields of rlhf.v1.ModelInfo."""
        loaded = self.current
        return dict(
            version=loaded.version,
            kind=loaded.kind,
            manifest_json=loaded.manifest.to_json(),
            pinned_version=self.pinned,
            available_versions=self.available_versions(),
            backend=backend,
        )
