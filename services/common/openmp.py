"""How long OpenMP worker threads spin before they sleep, for the processes
the platform starts (trainer jobs, the local stack's services).

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
"""

from __future__ import annotations

from collections.abc import Mapping

SPIN_COUNT = "1000"
_CHOSEN = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` plus the platform's OpenMP spin limit, unless `env` sets a wait policy itself."""
    out = dict(env)
    if not any(name in out for name in _CHOSEN):
        out["GOMP_SPINCOUNT"] = SPIN_COUNT
    return out
