"""Writing a file so that a reader sees the old contents or the new, never half of it."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path` (named by this process, so two writers never
    share one), then rename it over `path`. Creates the parent folder. No fsync: a crash may lose
    the write, never tear it (the controller's state and the dataset builder fsync on their own)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
