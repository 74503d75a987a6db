"""The work of a fused decode step outside its linear layers: residual add +
RMSNorm, rotary embedding, SiLU(gate) x up, and attention over each row's KV
window; and in bf16, where the CPU allows, the linear layers too (below). Two
implementations of one interface:

- `TorchOps`: torch ops, any dtype and device. Each job is a chain of small ops
  (F.rms_norm alone runs ~8, attention ~5), and on a CPU each op costs
  microseconds of dispatch and a pass over memory: in a 28-row bf16 decode
  step of SmolLM2-135M, profiled here, the 61 norms took ~190 us each, against
  ~25 us for the same arithmetic in one loop.
- `NativeOps`: the C loops in kernels.c, for CPU tensors in bf16 or fp32.
  Built once per machine with the system C compiler (`cc`, or $CC) for the
  host's own instruction set (-march=native), cached in RLHF_KERNEL_CACHE by a
  hash of the source, flags, compiler and CPU flags, and loaded with ctypes (no
  torch headers, so a build takes well under a second). Attention runs on the
  calling thread's OpenMP team: the library links torch's own libgomp. Before
  use, each kernel is checked against `TorchOps` on random inputs.

Measured here (SmolLM2-135M, AMX Xeon, 2 threads; medians of 40 decode steps,
the op sets interleaved step by step in one process), torch ops / native
elementwise with torch attention / all native:
- bf16, 28 rows: 76.0 / 68.9 / 66.2 ms; 14 rows: 65.7 / 56.7 / 51.4 ms;
  1 row: 44.7 / 41.3 / 34.9 ms;
- fp32, 28 rows: 148 / 142 / 134 ms; 1 row: 50.0 / 45.3 / 44.6 ms.
Attention's AVX-512 path (kernels.c) came later; measured the same way on
another day (medians of 30, 24 / 12 / 1 rows, 107 columns), torch ops / the
plain attention loops / the AVX-512 path: bf16 92.5 / 82.8 / 72.9,
64.6 / 52.4 / 49.0 and 52.2 / 40.2 / 38.8 ms; fp32, 24 rows (medians of 20):
160.5 / 145.1 / 142.3 ms.

Where the CPU has AVX512-BF16, `NativeOps` also has a bf16 matmul (`pack_linear`,
`linear`; fused.Linear takes it): on AMX tiles for any row count where the CPU
has them and Linux grants them, else on AVX512-BF16 dot products for steps of at
most SMALL_LINEAR_ROWS rows. oneDNN's reads the weights far below the memory's
speed at decode steps' row counts. Measured here, bf16 decode step plus greedy
pick, medians of 30 interleaved: oneDNN / dot products, 1 row 39.6 / 23.2 ms,
4 rows 39.6 / 25.5, 8 rows 41.1 / 31.8; oneDNN / tiles, 28 rows 66.5 / 42.1,
14 rows 38.8 / 25.5. On tiles two jobs ride on a matmul's last pass, from its
sums in registers: rope on q/k/v (28 rows 44.3 -> 43.8 ms) and SiLU x up on
gate/up (40.8 -> 39.9); and a whole layer is one call (`decode_layer`: 28 rows
38.9 -> 33.9 ms, 1 row 23.0 -> 18.1), each bit-equal to its jobs one by one.

`decode_ops` picks one: native where RLHF_NATIVE_KERNELS allows it, the model is
on the CPU in bf16 or fp32 with at most 64 query heads per K/V head, and the
build and the check pass; torch ops otherwise, with the reason (no compiler on
the image, say).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from services.common.dtypes import cpu_flags

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-march=native", "-std=c11", "-shared", "-fPIC")
# x86 compilers default to 256-bit vectors even where the CPU has AVX-512; the elementwise
# loops ran 1.2-1.4x faster with 512 (bf16, 32 rows, SmolLM2-135M shapes, one thread).
X86_FLAGS = ("-mprefer-vector-width=512",)
# OpenMP: torch's own libgomp, which the library then shares (the dynamic linker resolves
# its libgomp.so.1 to the one already loaded), so its parallel regions use the calling
# thread's team and thread count. Without that file, vector pragmas only: one thread.
TORCH_LIBGOMP = Path(torch.__file__).parent / "lib" / "libgomp.so.1"


def flags() -> tuple[str, ...]:
    x86 = X86_FLAGS if platform.machine().lower() in ("x86_64", "amd64") else ()
    return (*FLAGS, *x86, "-fopenmp" if TORCH_LIBGOMP.exists() else "-fopenmp-simd")


_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}
# Up to this many rows a bf16 linear layer runs on kernels.c's own matmul (where the CPU has
# AVX512-BF16), which reads the weights at the memory's speed; oneDNN's is faster above it.
# Measured here (SmolLM2-135M's 120 layer matmuls, bf16, 2 threads, medians of 12), oneDNN /
# native: 1 row 31.7 / 12.7 ms, 2 rows 25.6 / 13.7, 4 rows 23.7 / 14.5, 8 rows 23.4 / 20.2,
# 16 rows 24.9 / 33.9, 32 rows 33.8 / 67.0.
SMALL_LINEAR_ROWS = 8
# Where the CPU has AMX (and Linux grants the tiles), the native matmul runs any number of rows
# on them, for weights whose input width is a multiple of this (one tile's depth in bf16).
AMX_DEPTH = 32
MAX_GROUP = 64  # query heads per K/V head that kernels.c's attention has room for


class TorchOps:
    """The reference: plain torch ops, any dtype and device."""

    name = "torch"

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x += delta in place (when given), then RMSNorm(x) * weight."""
        if delta is not None:
            x.add_(delta)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    def rope(self, qkv: torch.Tensor, heads: int, dim: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The first `heads` heads of each row of `qkv` [n, width], rotated: [n, heads, dim].
        cos/sin: [n, dim / 2]. transformers' q * cos + rotate_half(q) * sin, rounded the same way."""
        qk = qkv[:, : heads * dim].view(qkv.shape[0], heads, dim)
        half = dim // 2
        a, b = qk[..., :half], qk[..., half:]
        cos, sin = cos[:, None], sin[:, None]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for rows laid out [gate | up]."""
        inter = gate_up.shape[-1] // 2
        return F.silu(gate_up[:, :inter]) * gate_up[:, inter:]

    def attention_mask(self, mask: torch.Tensor, kv_heads: int, group: int, dtype: torch.dtype) -> torch.Tensor:
        """A step's [n, columns] mask (True = attend) in the form `attention` takes: an additive
        bias of [n * kv_heads, group, columns], built once per step for every layer."""
        n, columns = mask.shape
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        return bias[:, None, None].expand(n, kv_heads, group, columns).reshape(n * kv_heads, group, columns)

    def attention(
        self, qk: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask, heads: int, scale: float
    ) -> torch.Tensor:
        """One new token per row: the queries `qk[:, :heads]` [n, heads, dim] over each row's
        keys/values [n, kv_heads, columns, dim] (read in place); [n, heads * dim]."""
        n, kv_heads, columns, dim = keys.shape
        group = heads // kv_heads
        # Each K/V head serves `group` query heads in place: [n * kv_heads, group, dim] queries.
        scores = torch.baddbmm(
            mask,
            qk[:, :heads].reshape(n * kv_heads, group, dim),
            keys.view(n * kv_heads, columns, dim).transpose(1, 2),
            alpha=scale,
        )
        out = torch.bmm(torch.softmax(scores, dim=-1), values.view(n * kv_heads, columns, dim))
        return out.view(n, heads * dim)

    def row_max(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's largest value (NaN where the row has one) and the first index holding it:
        a greedy pick, and a one-pass check that the row is usable (its max is finite)."""
        top = x.max(dim=-1)
        return top.values, top.indices


class NativeOps:
    """`TorchOps`' jobs in kernels.c, for CPU tensors of one dtype whose rows are contiguous."""

    name = "native"

    def __init__(self, library: ctypes.CDLL, dtype: torch.dtype):
        suffix = _SUFFIX[dtype]
        pointer, integer, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        self.dtype = dtype
        self._norm = getattr(library, f"add_rms_norm_{suffix}")
        self._norm.argtypes = [pointer, pointer, pointer, pointer, integer, integer, real]
        self._silu_mul = getattr(library, f"silu_mul_{suffix}")
        self._silu_mul.argtypes = [pointer, pointer, integer, integer]
        self._rope = getattr(library, f"rope_{suffix}")
        self._rope.argtypes = [pointer, integer, pointer, pointer, integer, integer, integer, integer]
        self._attention = getattr(library, f"decode_attention_{suffix}")
        self._attention.argtypes = [pointer, integer, pointer, pointer, integer, integer, pointer, pointer]
        self._attention.argtypes += [integer] * 5 + [real]
        self._attention.restype = ctypes.c_int
        self._row_max = getattr(library, f"row_max_{suffix}")
        self._row_max.argtypes = [pointer, integer, integer, integer, pointer, pointer]
        self._small_linear = dtype == torch.bfloat16 and bool(library.linear_available())
        self._pack_linear = library.pack_linear_bf16
        self._pack_linear.argtypes = [pointer, integer, integer, pointer]
        self._linear = library.linear_bf16
        self._linear.argtypes = [pointer, integer, integer, integer, pointer, integer, pointer]
        self._linear.restype = ctypes.c_int
        self._amx = self._small_linear and bool(library.amx_available())
        self._linear_amx = library.linear_amx_bf16
        self._linear_amx.argtypes = self._linear.argtypes
        self._linear_amx.restype = ctypes.c_int
        self._linear_silu_amx = library.linear_silu_amx_bf16
        self._linear_silu_amx.argtypes = self._linear.argtypes
        self._linear_silu_amx.restype = ctypes.c_int
        self._linear_rope_amx = library.linear_rope_amx_bf16
        self._linear_rope_amx.argtypes = self._linear.argtypes + [pointer, pointer, integer, integer, integer]
        self._linear_rope_amx.restype = ctypes.c_int
        self._decode_layer = library.decode_layer_bf16
        self._decode_layer.argtypes = [pointer, pointer, integer, integer] + [pointer] * 3 + [integer]
        self._decode_layer.argtypes += [pointer] * 3 + [real, pointer, pointer, integer, pointer, pointer]
        self._decode_layer.argtypes += [integer] * 3 + [pointer] + [integer] * 4 + [real, pointer]
        self._decode_layer.restype = ctypes.c_int

    def _check(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            if t.dtype != self.dtype or t.device.type != "cpu" or t.stride(-1) != 1:
                raise ValueError(
                    f"native kernels take CPU {self.dtype} tensors with unit stride, not {t.dtype} {t.stride()}"
                )

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
        self._check(x, weight, *([] if delta is None else [delta]))
        if not x.is_contiguous() or (delta is not None and not delta.is_contiguous()):
            raise ValueError("add_norm needs contiguous rows")
        out = torch.empty_like(x)
        n, hidden = x.shape
        self._norm(
            x.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(), out.data_ptr(), n, hidden, eps
        )
        return out

    def rope(self, qkv: torch.Tensor, heads: int, dim: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        self._check(qkv, cos, sin)
        if cos.stride() != sin.stride():
            raise ValueError("cos and sin must share a layout")
        n = qkv.shape[0]
        self._rope(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), cos.stride(0), n, heads, dim)
        return qkv[:, : heads * dim].view(n, heads, dim)  # rotated in place

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        self._check(gate_up)
        if not gate_up.is_contiguous():
            raise ValueError("silu_mul needs contiguous rows")
        n, inter = gate_up.shape[0], gate_up.shape[1] // 2
        out = gate_up.new_empty((n, inter))
        self._silu_mul(gate_up.data_ptr(), out.data_ptr(), n, inter)
        return out

    def attention_mask(self, mask: torch.Tensor, kv_heads: int, group: int, dtype: torch.dtype) -> torch.Tensor:
        return mask.to(torch.uint8).contiguous()  # decode_ops checked that `group` fits

    def attention(
        self, qk: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask, heads: int, scale: float
    ) -> torch.Tensor:
        self._check(qk, keys, values)
        n, kv_heads, columns, dim = keys.shape
        if keys.stride() != values.stride() or keys.stride(2) != dim or qk.stride(1) != dim:
            raise ValueError("attention reads whole rows of dim values: keys and values share a layout")
        out = qk.new_empty((n, heads * dim))
        status = self._attention(
            qk.data_ptr(), qk.stride(0), keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1),
            mask.data_ptr(), out.data_ptr(), n, heads, kv_heads, columns, dim, scale,
        )  # fmt: skip
        if status:
            raise MemoryError("native attention could not allocate its scratch memory")
        return out

    def pack_linear(self, weight: torch.Tensor) -> torch.Tensor | None:
        """`weight` [out, in] reordered for `linear` (a copy), or None where that kernel does not
        apply: not bf16, no AVX512-BF16 on this CPU, out not a multiple of 16 or in odd."""
        out, width = weight.shape
        if not self._small_linear or weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
            return None
        if out % 16 or width % 2:
            return None
        plain = weight.detach().contiguous()
        packed = torch.empty((out, width // 2), dtype=torch.int32)
        self._pack_linear(plain.data_ptr(), out, width, packed.data_ptr())
        return packed

    def _on_tiles(self, width: int) -> bool:
        return self._amx and width % AMX_DEPTH == 0

    def _packed_on_tiles(self, packed: torch.Tensor) -> bool:
        return self._on_tiles(2 * packed.shape[1])  # `pack_linear` keeps the input width in pairs

    def linear_rows(self, packed: torch.Tensor) -> float:
        """The most rows at once that `linear` is the faster matmul for, given `pack_linear`'s
        copy of a weight: any number where it runs on AMX tiles, else SMALL_LINEAR_ROWS."""
        return math.inf if self._packed_on_tiles(packed) else SMALL_LINEAR_ROWS

    def gates(self, packed: torch.Tensor) -> bool:
        """Whether `linear(..., gated=True)` takes this weight: on tiles, in two equal halves of
        whole 16-column blocks."""
        return self._packed_on_tiles(packed) and packed.shape[0] % 32 == 0

    def rotates(self, packed: torch.Tensor, heads: int, dim: int) -> bool:
        """Whether `linear(..., rotate=(heads, dim, cos, sin))` takes this weight: on tiles, heads
        of whole 16-column blocks per half, all within its output."""
        return self._packed_on_tiles(packed) and dim % 32 == 0 and heads * dim <= packed.shape[0]

    def linear(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        gated: bool = False,
        rotate: tuple[int, int, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [rows, in] . W^T from `pack_linear`'s copy of W: fp32 sums rounded once to bf16, as
        oneDNN's are (in another order, so the last bit can differ). On AMX tiles where the CPU
        grants them and `in` is a multiple of AMX_DEPTH, else AVX512-BF16 dot products. Two
        jobs can ride on the tiles' last pass, from the sums in registers, bit for bit:
        - `gated` (where `gates`): W is [gate | up]; the result is silu_mul's ([rows, out / 2]);
        - `rotate` = (heads, dim, cos, sin) (where `rotates`): the result's first `heads` heads
          of `dim` values come rotated as `rope` rotates them (cos, sin: [rows, dim / 2])."""
        self._check(x)
        rows, width = x.shape
        if x.stride(0) % 2 or x.data_ptr() % 4:
            x = x.contiguous()
        if gated and not self.gates(packed):
            raise ValueError("a gated matmul runs on AMX tiles, over two halves of whole 16-column blocks")
        if rotate is not None and not self.rotates(packed, *rotate[:2]):
            raise ValueError("a rotating matmul runs on AMX tiles, for heads of whole 16-column blocks per half")
        out = x.new_empty((rows, packed.shape[0] // 2 if gated else packed.shape[0]))
        args = [x.data_ptr(), x.stride(0), rows, width, packed.data_ptr(), packed.shape[0], out.data_ptr()]
        if rotate is not None:
            heads, dim, cos, sin = rotate
            self._check(cos, sin)
            if cos.stride() != sin.stride() or cos.shape != (rows, dim // 2):
                raise ValueError("cos and sin: [rows, dim / 2] each, of one layout")
            status = self._linear_rope_amx(*args, cos.data_ptr(), sin.data_ptr(), cos.stride(0), heads, dim)
        else:
            kernel = self._linear_silu_amx if gated else self._linear_amx if self._on_tiles(width) else self._linear
            status = kernel(*args)
        if status:
            raise MemoryError("the native matmul could not allocate its scratch memory")
        return out

    def decodes_layers(self, qkv: torch.Tensor, o: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
        """Whether `decode_layer` takes a layer of these `pack_linear` weights: all on tiles, gate/up
        gated."""
        return all(self._packed_on_tiles(w) for w in (qkv, o, gate_up, down)) and self.gates(gate_up)

    def decode_layer(
        self,
        x: torch.Tensor,
        normed: torch.Tensor,
        weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        norms: tuple[torch.Tensor, torch.Tensor],
        eps: float,
        rotation: tuple[torch.Tensor, torch.Tensor],
        keys: torch.Tensor,
        values: torch.Tensor,
        end: int,
        mask: torch.Tensor,
        heads: int,
        scale: float,
        scratch: torch.Tensor,
    ) -> None:
        """One decoder layer of a bf16 decode step in one call (kernels.c decode_layer_bf16), the
        same bits as its jobs one by one: `normed` [n, hidden] in, the next norm's output out;
        `x`, the residual stream, updated; the new keys and values written at column `end` of
        `keys`/`values` [n, kv_heads, columns, dim]. weights: q/k/v, o, gate/up, down from
        `pack_linear` (where `decodes_layers`); norms: after attention, and the next one's;
        rotation: (cos, sin) [n, dim / 2]; mask from `attention_mask`; scratch: a bf16 buffer of
        at least `layer_scratch` values."""
        qkv, o, gate_up, down = weights
        n, hidden = x.shape
        _, kv_heads, columns, dim = keys.shape
        cos, sin = rotation
        self._check(x, normed, keys, values, cos, sin, scratch, *norms)
        if (
            keys.stride() != values.stride()
            or keys.stride(2) != dim
            or not (x.is_contiguous() and normed.is_contiguous())
        ):
            raise ValueError("decode_layer takes contiguous rows, and keys and values of one layout")
        if cos.stride() != sin.stride() or scratch.numel() < self.layer_scratch(n, qkv, gate_up, heads * dim, hidden):
            raise ValueError("decode_layer: cos and sin of one layout, and scratch of layer_scratch values")
        status = self._decode_layer(
            x.data_ptr(), normed.data_ptr(), n, hidden, qkv.data_ptr(), o.data_ptr(), gate_up.data_ptr(),
            gate_up.shape[0], down.data_ptr(), norms[0].data_ptr(), norms[1].data_ptr(), eps, cos.data_ptr(),
            sin.data_ptr(), cos.stride(0), keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1), end,
            mask.data_ptr(), heads, kv_heads, columns, dim, scale, scratch.data_ptr(),
        )  # fmt: skip
        if status:
            raise MemoryError("the native decoder layer could not allocate its scratch memory")

    @staticmethod
    def layer_scratch(n: int, qkv: torch.Tensor, gate_up: torch.Tensor, q_width: int, hidden: int) -> int:
        """The bf16 values of scratch `decode_layer` needs for n rows."""
        return n * (qkv.shape[0] + q_width + hidden + gate_up.shape[0] // 2 + hidden)

    def row_max(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dtype != self.dtype or x.device.type != "cpu" or x.stride(-1) != 1:
            return TorchOps.row_max(self, x)  # logits of another dtype (a caller's own upcast, say)
        n, width = x.shape
        values = torch.empty(n, dtype=torch.float32)
        indices = torch.empty(n, dtype=torch.long)
        self._row_max(x.data_ptr(), x.stride(0), n, width, values.data_ptr(), indices.data_ptr())
        return values, indices


class BuildError(RuntimeError):
    pass


def build(cache_dir: Path, compiler: str | None = None) -> Path:
    """kernels.c compiled for this machine, from `cache_dir` when an identical build
    (same source, flags, compiler and CPU flags) is already there. Raises BuildError."""
    compiler = compiler or os.environ.get("CC") or "cc"
    found = shutil.which(compiler)
    if found is None:
        raise BuildError(f"no C compiler {compiler!r} on PATH (set CC, or RLHF_NATIVE_KERNELS=false)")
    source = SOURCE.read_bytes()
    cpu_key = " ".join([platform.machine(), *sorted(cpu_flags())])
    key = hashlib.sha256(b"\0".join([source, " ".join(flags()).encode(), found.encode(), cpu_key.encode()])).hexdigest()
    target = cache_dir / f"kernels-{key[:16]}.so"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: processes building at once never read a partial file.
    handle, partial = tempfile.mkstemp(dir=cache_dir, suffix=".so.partial")
    os.close(handle)
    try:
        result = subprocess.run(
            [found, *flags(), "-o", partial, str(SOURCE)], capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise BuildError(f"{compiler} failed ({result.returncode}): {result.stderr.strip()[-500:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _agrees(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Within two units in the last place of `want`'s dtype: the kernels sum a row's squares
    in another order than torch does (bf16 rounding can show that), and their exp is a
    polynomial (~2e-7 relative error, an fp32 ulp is 1.2e-7)."""
    ulp = 2 * torch.finfo(want.dtype).eps
    got, want = got.float(), want.float()
    return bool(((got - want).abs() <= ulp * want.abs() + 1e-6).all())


def disagreement(ops: NativeOps, reference: TorchOps | None = None, seed: int = 0) -> str | None:
    """Which kernel differs from `TorchOps` on random inputs of decode-step shapes (None: none)."""
    reference = reference or TorchOps()
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * scale).to(ops.dtype)

    n, hidden, heads, dim = 5, 96, 7, 16
    x, delta, weight = rand(n, hidden, scale=3), rand(n, hidden), rand(hidden)
    mine, theirs = x.clone(), x.clone()
    for d in (delta, None):
        if not _agrees(ops.add_norm(mine, d, weight, 1e-5), reference.add_norm(theirs, d, weight, 1e-5)):
            return "add_norm"
        if not torch.equal(mine, theirs):
            return "add_norm's residual add"
    gate_up = rand(n, 2 * hidden, scale=4)
    if not _agrees(ops.silu_mul(gate_up), reference.silu_mul(gate_up)):
        return "silu_mul"
    qkv = rand(n, (heads + 2) * dim)
    angles = torch.rand((n, dim // 2), generator=generator) * 50
    cos, sin = angles.cos().to(ops.dtype), angles.sin().to(ops.dtype)
    want = reference.rope(qkv.clone(), heads, dim, cos, sin)
    if not _agrees(ops.rope(qkv.clone(), heads, dim, cos, sin), want):
        return "rope"
    # Attention over a window of a larger K/V buffer, some columns masked, as a decode step reads it:
    # 6 query heads in groups of 3 over 2 K/V heads.
    heads, kv_heads, columns = 6, 2, 21
    buffers = rand(2, n + 2, kv_heads, columns + 9, dim)
    keys, values = buffers[0, :n, :, 4 : 4 + columns], buffers[1, :n, :, 4 : 4 + columns]
    mask = torch.rand((n, columns), generator=generator) > 0.3
    mask[:, -1] = True  # every row attends to its newest token
    qk = rand(n, heads + kv_heads, dim)
    got = ops.attention(qk, keys, values, ops.attention_mask(mask, kv_heads, 3, ops.dtype), heads, dim**-0.5)
    plain = reference.attention_mask(mask, kv_heads, 3, ops.dtype)
    if not _agrees(got, reference.attention(qk, keys, values, plain, heads, dim**-0.5)):
        return "attention"
    # The matmul on dot products (an input width that AMX tiles do not take), and where the CPU has
    # them on tiles: rows that fill one tile and a part of another.
    for rows, width in ((3, 40), (20, 2 * AMX_DEPTH)):
        weight = rand(64, width, scale=0.2)
        packed = ops.pack_linear(weight)
        if packed is not None:
            x = rand(rows, width)
            want = x.float() @ weight.float().T
            if not bool(((ops.linear(x, packed).float() - want).abs() <= 2**-8 * want.abs() + 1e-3).all()):
                return "linear"
            if ops.gates(packed) and not torch.equal(ops.linear(x, packed, True), ops.silu_mul(ops.linear(x, packed))):
                return "gated linear"
            if ops.rotates(packed, 1, 32):  # one rotated head of 32 values, then two blocks left as they are
                turns = torch.rand((rows, 16), generator=generator) * 50
                cos, sin = turns.cos().to(ops.dtype), turns.sin().to(ops.dtype)
                want = ops.linear(x, packed)
                ops.rope(want, 1, 32, cos, sin)
                if not torch.equal(ops.linear(x, packed, rotate=(1, 32, cos, sin)), want):
                    return "rotating linear"
    # Logits-like rows: wider than a register block with a ragged end, ties (the first index
    # counts), a row of -inf, and a NaN.
    scores = rand(6, 53)
    scores[1, 7] = scores[1, 40] = scores[1].max() + 1
    scores[2] = float("-inf")
    scores[3, 52] = 1e4
    scores[4, 20] = float("nan")
    (mine, at), (theirs, where) = ops.row_max(scores), reference.row_max(scores)
    finite = torch.isfinite(theirs.float())
    if not (torch.equal(mine[finite], theirs.float()[finite]) and torch.equal(at[finite], where[finite])):
        return "row_max"
    if not torch.equal(torch.isnan(mine), torch.isnan(theirs)) or mine[2] != float("-inf") or at[2] != 0:
        return "row_max's non-finite rows"
    return None


@functools.cache
def _native(dtype: torch.dtype, cache_dir: Path) -> tuple[NativeOps | None, str]:
    try:
        ops = NativeOps(ctypes.CDLL(str(build(cache_dir))), dtype)
    except (BuildError, OSError, subprocess.SubprocessError) as err:
        return None, f"native kernels unavailable: {err}"
    wrong = disagreement(ops)
    if wrong:
        return None, f"native {wrong} disagrees with torch on this machine"
    return ops, f"built for this CPU ({_SUFFIX[dtype]})"


def decode_ops(
    dtype: torch.dtype, device: torch.device, enabled: bool, cache_dir: Path, group: int = 1
) -> tuple[TorchOps | NativeOps, str]:
    """The ops for the decode step of a model of `dtype` on `device` whose K/V heads each
    serve `group` query heads, and why those."""
    if not enabled:
        return TorchOps(), "RLHF_NATIVE_KERNELS=false"
    if device.type != "cpu" or dtype not in _SUFFIX:
        return TorchOps(), f"no native kernels for {dtype} on {device.type}"
    if group > MAX_GROUP:
        return TorchOps(), f"native attention serves at most {MAX_GROUP} query heads per K/V head, not {group}"
    ops, reason = _native(dtype, Path(cache_dir))
    return (ops or TorchOps()), reason
