"""Which floating-point dtype this machine runs fast: one rule for serving and training.

bf16 halves memory traffic and, where the hardware has native bf16 arithmetic,
doubles matmul throughput. Where it does not, PyTorch emulates it: on an AVX2-only
x86 CPU a 512x512 bf16 matmul measured about 25x slower than fp32 (GUIDE.md §3).
So `auto` picks bf16 only on a GPU or on a CPU that has AVX512-BF16 or AMX, and
fp32 everywhere else, including a CPU with those flags where PyTorch runs below
AVX-512 (ATEN_CPU_CAPABILITY=avx2), whose bf16 is emulated too. The choice and
its reason are logged by the caller.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16_flags() -> list[str]:
    """The CPU's native bf16 extensions that PyTorch's kernels can reach: none when PyTorch runs
    below AVX-512 (an older CPU, or ATEN_CPU_CAPABILITY=avx2 set by hand), since its bf16 then
    goes through the emulated path whatever /proc/cpuinfo says."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return []
    return [f for f in NATIVE_BF16_FLAGS if f in cpu_flags()]


def cpu_capability() -> str:
    """PyTorch's view of the CPU's vector unit ("AVX512", "AVX2", ...), plus native bf16 if usable."""
    cap = torch.backends.cpu.get_cpu_capability()
    native = native_bf16_flags()
    return f"{cap}+{'+'.join(native)}" if native else cap


def cpu_has_native_bf16() -> bool:
    return bool(native_bf16_flags())


def resolve_dtype(name: str, device: str = "cpu") -> tuple[torch.dtype, str]:
    """(dtype, reason) for a setting of "auto", "float32" or "bfloat16" on `device`."""
    if name == "float32":
        return torch.float32, "float32 set explicitly"
    if name == "bfloat16":
        return torch.bfloat16, "bfloat16 set explicitly"
    if name != "auto":
        raise ValueError(f"dtype {name!r} must be auto, float32 or bfloat16")
    if device.startswith("cuda"):
        return torch.bfloat16, "auto: GPU"
    if cpu_has_native_bf16():
        return torch.bfloat16, f"auto: CPU has native bf16 ({cpu_capability()})"
    return torch.float32, f"auto: CPU has no native bf16 ({cpu_capability()}); bf16 would be emulated"
