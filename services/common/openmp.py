"""OpenMP in the platform's processes: how long idle worker threads spin
(short for the trainer jobs the platform starts), and which thread of a serving
process runs multi-threaded kernels.

## Spinning, across processes

PyTorch's CPU kernels run on libgomp, whose idle threads spin-wait for the
next parallel region before sleeping. That is fastest on an idle machine,
but when two busy processes share the cores (a trainer beside a generating
policy service, a demo beside a benchmark, a pod at its CPU limit) each
process's spinning threads take the cores the other's working thread needs.
Measured on this 2-core machine with another 2-thread process busy: a
30-layer width-576 forward+backward under bf16 autocast ran 1.6 steps/s with
the default spin, 23 with GOMP_SPINCOUNT=1000 and 21 with one thread; the
trainers' RM steps went from about 4 s to about 70 s. Short spinning keeps a
process usable under contention.

`child_env` adds GOMP_SPINCOUNT to a child's environment unless the caller
already chose a wait policy (OMP_WAIT_POLICY or GOMP_SPINCOUNT), which wins.
It is for trainer jobs, whose parallel regions are large. A serving process
is the opposite case: a decode step of one row is ~200 tiny regions, each
paying a futex wake-up when the workers have gone to sleep. Measured here
(SmolLM2-135M, bf16, prepacked, one row, median step): 27 ms with the default
spin, 79 ms with GOMP_SPINCOUNT=1000, 29 ms with 20000 (but 368 ms with 20000
beside a busy process, against 65 ms with 1000). Serving processes (the local
stack's services, the k8s Deployments) keep the default.

## One OpenMP team per serving process

libgomp keeps one pool of worker threads per thread that starts a parallel
region, and when the threads it manages outnumber the CPUs it cuts every
pool's spinning to a few hundred iterations ("throttled"). A serving process
has several threads that run torch: the main thread loads the first model,
the hot-swap worker loads later ones, the engine decodes. With 2 threads
each, the pools outnumber 2 cores and the engine's decode step runs as if
GOMP_SPINCOUNT were tiny: measured here, the same one-row step took 51-55 ms
on a second Python thread against 23-27 ms on the main thread, and 22-30 ms
on the second thread once the main thread had used one intra-op thread.

So a serving process has one compute thread (the engine's decode loop, the
reward scorer's batches), which calls `compute_thread`; every other thread
that runs torch (model loading, prepacking, warm-up) calls `side_thread`
first and runs on one intra-op thread, which starts no pool. Work the
caller's own thread must wait for (the first model load) goes through
`on_side_thread`, so the caller's thread keeps its thread count (a test
process's main thread, say).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TypeVar

T = TypeVar("T")

SPIN_COUNT = "1000"
_CHOSEN = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` plus the platform's OpenMP spin limit, unless `env` sets a wait policy itself."""
    out = dict(env)
    if not any(name in out for name in _CHOSEN):
        out["GOMP_SPINCOUNT"] = SPIN_COUNT
    return out


_default_threads: int | None = None


def default_threads() -> int:
    """torch's intra-op thread count before this module changed it (the cores it may use)."""
    global _default_threads
    if _default_threads is None:
        import torch

        _default_threads = torch.get_num_threads()
    return _default_threads


def compute_thread(threads: int = 0) -> int:
    """Call at the top of the thread that runs a process's model work: it gets
    `threads` intra-op threads (0 = the default, the cores torch may use). Returns the count."""
    import torch

    n = threads or default_threads()
    torch.get_num_threads()  # torch sets a thread's count from a process-wide value on its first use: do that first
    torch.set_num_threads(n)
    return n


def side_thread() -> None:
    """Call at the top of any other thread that runs torch (loading, warm-up):
    one intra-op thread, so it starts no second OpenMP pool."""
    import torch

    default_threads()  # remember the default before lowering it
    torch.get_num_threads()  # first use first (see compute_thread)
    torch.set_num_threads(1)


def on_side_thread(fn: Callable[[], T], name: str = "side-thread") -> T:
    """`fn()` on a new side thread (one intra-op thread); waits, returns its result or raises its error."""
    out: dict[str, object] = {}

    def run() -> None:
        side_thread()
        try:
            out["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = err

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    worker.join()
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["value"]  # type: ignore[return-value]
