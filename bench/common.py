"""Shared benchmark plumbing: a printed table and a JSON file per benchmark.

Every benchmark runs its baseline in the same run and reports the ratio,
because these machines are noisy. Results go to bench/results/<name>.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from services.common.provenance import commit, machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MODEL_CACHE = Path(os.environ.get("RLHF_MODEL_CACHE", "~/.cache/rlhf-platform")).expanduser()


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def print_table(title: str, rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [
        title,
        "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_results(name: str, payload: Mapping[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    body = {
        "benchmark": name,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "commit": commit(),
        **payload,
    }
    path.write_text(json.dumps(body, indent=2, default=str))
    print(f"wrote {path}", flush=True)
    return path


@contextlib.contextmanager
def trainer_sandbox(prefix: str, **env: str) -> Iterator[Path]:
    """A scratch folder with a broker of its own, and this process's environment pointed at both,
    for a benchmark that runs trainer jobs in-process: the trainers announce their checkpoints as
    in production. Yields the folder; on exit stops the broker and deletes the folder (a PPO run
    leaves 2.6 GB of checkpoints there), unless BENCH_KEEP=1."""
    from services.common.broker import free_port, start_broker, stop_process

    work = Path(tempfile.mkdtemp(prefix=prefix))
    port = free_port()
    broker = start_broker(port, log_path=work / "tansu.log")
    os.environ.update(
        {
            "RLHF_HOME": str(work / "home"),
            "RLHF_MODEL": "tiny",
            "RLHF_MODEL_CACHE": str(MODEL_CACHE),
            "RLHF_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
            "RLHF_TOPIC_PREFIX": f"bench{uuid.uuid4().hex[:6]}",
            "RLHF_TOPIC_PARTITIONS": "1",
            **env,
        }
    )
    try:
        yield work
    finally:
        stop_process(broker)
        if os.environ.get("BENCH_KEEP") == "1":
            print(f"kept {work} (BENCH_KEEP=1)")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run_threads(n_threads: int, work) -> float:
    """Run work(0) .. work(n_threads - 1) on their own threads; the wall seconds until all return."""
    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started
