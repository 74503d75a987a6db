"""The dtype rule follows the kernels PyTorch actually runs, not only /proc/cpuinfo."""

import json
import os
import subprocess
import sys

PROBE = (
    "import json, torch; from services.common import dtypes, provenance; "
    "print(json.dumps([str(dtypes.resolve_dtype('auto')[0]), dtypes.cpu_capability(), provenance.machine()]))"
)


def probe(**env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_auto_is_fp32_when_pytorch_runs_below_avx512():
    # On a CPU with AVX512-BF16 this is the case that matters: capped at AVX2, PyTorch emulates bf16
    # (a 512x512 matmul measured 2.4 GFLOP/s against 88 for fp32 on this repo's 2-core EPYC).
    dtype, capability, machine = probe(ATEN_CPU_CAPABILITY="avx2")
    assert (dtype, capability) == ("torch.float32", "AVX2")
    assert "CPU capability AVX2 (capped by ATEN_CPU_CAPABILITY=avx2 on a CPU with" in machine  # reports say so


def test_auto_matches_the_machine_without_a_cap():
    from services.common.dtypes import cpu_flags

    dtype, capability, machine = probe()
    assert "capped" not in machine
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in cpu_flags()] and capability.startswith("AVX512")
    assert dtype == ("torch.bfloat16" if native else "torch.float32")
    assert ("bf16" in capability) == bool(native)
