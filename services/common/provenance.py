"""What produced a figure: the checked-out commit and the machine, recorded with every
benchmark result (bench/) and every demo report (services/demo.py), so that a table
built later from those files (bench/report.py) names the code and the CPU that measured
each figure, not the ones that happened to build the table."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


CAPPED = "capped by ATEN_CPU_CAPABILITY"  # how machine() marks a PyTorch capped below its CPU


def machine() -> str:
    """This machine in words: cores, architecture and CPU capability (it decides the auto dtype),
    naming the CPU's own flags when PyTorch was capped below them by hand."""
    from services.common.dtypes import NATIVE_BF16_FLAGS, cpu_capability, cpu_flags

    text = f"{os.cpu_count()}-core {platform.machine()}, CPU capability {cpu_capability()}"
    cap = os.environ.get("ATEN_CPU_CAPABILITY")
    if cap:
        own = ", ".join(sorted({"avx512f", *NATIVE_BF16_FLAGS} & cpu_flags())) or "no AVX-512"
        text += f" ({CAPPED}={cap} on a CPU with {own})"
    return text


def commit() -> str:
    """The checked-out commit ("unknown" outside a git checkout)."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"
