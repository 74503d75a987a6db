"""The fused decode step's native kernels (services/policy/kernels.py): built once per
machine and cached, checked against torch ops before use, and replaced by torch ops,
with the reason, wherever they cannot be built or disagree."""

from __future__ import annotations

import math

import pytest
import torch

from services.policy import kernels
from services.policy.fused import Linear
from services.policy.kernels import (
    SMALL_LINEAR_ROWS,
    BuildError,
    NativeOps,
    TorchOps,
    build,
    decode_ops,
    disagreement,
)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    import ctypes

    return ctypes.CDLL(str(build(tmp_path_factory.mktemp("kernels"))))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_ops_agree_with_torch_at_the_served_models_shapes(library, dtype):
    native, reference = NativeOps(library, dtype), TorchOps()
    assert disagreement(native) is None
    generator = torch.Generator().manual_seed(1)
    n, hidden, inter, heads, dim = 28, 576, 1536, 12, 64  # SmolLM2-135M: 9 query + 3 key heads
    x = (torch.randn((n, hidden), generator=generator) * 4).to(dtype)
    delta = torch.randn((n, hidden), generator=generator).to(dtype)
    weight = torch.randn(hidden, generator=generator).to(dtype)
    mine, theirs = x.clone(), x.clone()
    got, want = native.add_norm(mine, delta, weight, 1e-5), reference.add_norm(theirs, delta, weight, 1e-5)
    assert torch.equal(mine, theirs)  # the residual stream: the same rounding exactly
    ulp = 2 * torch.finfo(dtype).eps  # see kernels._agrees
    torch.testing.assert_close(got.float(), want.float(), rtol=ulp, atol=1e-6)
    gate_up = (torch.randn((n, 2 * inter), generator=generator) * 5).to(dtype)
    torch.testing.assert_close(
        native.silu_mul(gate_up).float(), reference.silu_mul(gate_up).float(), rtol=ulp, atol=1e-6
    )
    qkv = torch.randn((n, (heads + 3) * dim), generator=generator).to(dtype)
    angles = torch.arange(n, dtype=torch.float32)[:, None] * torch.rand(dim // 2, generator=generator)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    want = reference.rope(qkv.clone(), heads, dim, cos, sin)
    rotated = qkv.clone()
    got = native.rope(rotated, heads, dim, cos, sin)
    torch.testing.assert_close(got.float(), want.float(), rtol=ulp, atol=1e-6)
    assert torch.equal(rotated[:, heads * dim :], qkv[:, heads * dim :])  # values untouched
    # Attention: 9 query heads over 3 K/V heads, a 128-column window of a 200-column buffer, left padding.
    buffers = torch.randn((2, 32, 3, 200, dim), generator=generator).to(dtype)
    keys, values = buffers[0, :n, :, 50:178], buffers[1, :n, :, 50:178]
    mask = torch.ones((n, 128), dtype=torch.bool)
    for row in range(n):
        mask[row, : row * 4] = False
    qk = torch.randn((n, 12, dim), generator=generator).to(dtype)
    got = native.attention(qk, keys, values, native.attention_mask(mask, 3, 3, dtype), 9, dim**-0.5)
    want = reference.attention(qk, keys, values, reference.attention_mask(mask, 3, 3, dtype), 9, dim**-0.5)
    torch.testing.assert_close(got.float(), want.float(), rtol=ulp, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dim", [16, 24, 128])
def test_native_attention_agrees_with_torch_for_every_head_size(library, dtype, dim):
    """Head sizes that are a multiple of 16 take the AVX-512 path where the CPU has it (64 is
    covered above), others the plain loops: both round like torch, over windows longer than
    one 16-column block and with holes in the mask. The softmax scale is a power of two, as
    at the served head size (64): then rounding q.k before scaling (kernels.c, as kv.py's
    decode_attention) and after it (TorchOps) agree exactly."""
    native, reference = NativeOps(library, dtype), TorchOps()
    generator = torch.Generator().manual_seed(dim)
    n, heads, kv_heads, columns = 6, 8, 2, 45
    keys, values = torch.randn((2, n, kv_heads, columns, dim), generator=generator).to(dtype)
    mask = torch.rand((n, columns), generator=generator) > 0.2
    mask[:, -1] = True
    mask[0, :-1] = False  # a row with one column: its first token
    qk = torch.randn((n, heads + kv_heads, dim), generator=generator).to(dtype)
    got = native.attention(qk, keys, values, native.attention_mask(mask, kv_heads, 4, dtype), heads, 0.125)
    want = reference.attention(qk, keys, values, reference.attention_mask(mask, kv_heads, 4, dtype), heads, 0.125)
    ulp = 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(got.float(), want.float(), rtol=ulp, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_row_max_is_torchs_max_over_a_vocabulary(library, dtype):
    """The greedy pick: each row's largest score and the first index that holds it, as
    torch.max gives them, over the served vocabulary (49152) and a ragged width; rows with a
    tie, +inf, nothing but -inf, and a NaN (which the engine fails alone); many rows (split
    over the OpenMP team) and one."""
    native = NativeOps(library, dtype)
    generator = torch.Generator().manual_seed(7)
    for width in (49152, 1037):
        x = torch.randn((28, width), generator=generator).to(dtype)
        x[1, [5, width - 3]] = 30.0  # a tie: the first index counts
        x[2, 17] = float("inf")
        x[3] = float("-inf")
        x[4, 3] = float("nan")
        x[5, width - 1] = 40.0  # in the last, partial block
        for rows in (x, x[6:7]):
            values, indices = native.row_max(rows)
            want = rows.max(dim=-1)
            torch.testing.assert_close(values, want.values.float(), rtol=0, atol=0, equal_nan=True)
            usable = ~torch.isnan(want.values)
            assert torch.equal(indices[usable], want.indices[usable])
        assert indices.tolist() == [want.indices[0].item()]  # the one-row call
        values, indices = native.row_max(x)
        assert indices[1] == 5 and indices[5] == width - 1 and indices[3] == 0 and torch.isnan(values[4])


@pytest.mark.parametrize("tiles", [False, True], ids=["dot products", "AMX tiles"])
def test_native_linear_matches_a_float32_matmul(library, tiles):
    """kernels.c's bf16 matmul: fp32 sums rounded once to bf16, at the served model's shapes
    and small ones, rows read through a stride. On AVX512-BF16 dot products (tiles off), up to
    SMALL_LINEAR_ROWS rows (blocks of 8, 4, 2 and 1), and fused.Linear takes oneDNN's
    (bit-equal to F.linear) above that. On AMX tiles where the CPU grants them, at any row count
    (a part of a tile, one, a tile and a part, three), and fused.Linear keeps no other copy."""
    native = NativeOps(library, torch.bfloat16)
    if not tiles:
        native._amx = False
    generator = torch.Generator().manual_seed(3)
    weight = (torch.randn((960, 576), generator=generator) * 576**-0.5).to(torch.bfloat16)
    packed = native.pack_linear(weight)
    if packed is None:  # no AVX512-BF16 on this CPU: every row count stays on oneDNN's matmul
        assert not library.linear_available()
        x = torch.randn((1, 576), generator=generator).to(torch.bfloat16)
        assert torch.equal(Linear(weight, 32, native)(x), torch.nn.functional.linear(x, weight))
        return
    if tiles and not native._amx:  # no AMX here: the dot products serve the first few rows only
        assert native.linear_rows(packed) == SMALL_LINEAR_ROWS
        return
    counts = range(1, 10) if not tiles else [1, 5, 9, 16, 17, 32, 33, 47]
    cases = [((960, 576), n) for n in counts] + [((48, 40), 3), ((576, 1536), 8), ((32, 64), 20)]
    for (out, width), rows in cases:
        w = weight if out == 960 else (torch.randn((out, width), generator=generator) * width**-0.5).to(torch.bfloat16)
        x = torch.randn((rows, 2 * width), generator=generator).to(torch.bfloat16)[:, :width]  # a row stride of 2x
        got = native.linear(x, native.pack_linear(w)).float()
        want = x.float() @ w.float().T
        torch.testing.assert_close(got, want, rtol=2**-8, atol=1e-3)
    assert NativeOps(library, torch.float32).pack_linear(weight.float()) is None
    assert native.pack_linear(weight[:40]) is None and native.pack_linear(weight[:, :575]) is None
    layer = Linear(weight, 32, native)
    x = torch.randn((40, 576), generator=generator).to(torch.bfloat16)
    if tiles:
        assert native.linear_rows(packed) == math.inf and layer.packed is None and layer.weight is None
        assert torch.equal(layer(x), native.linear(x, packed))
        # [gate | up] with silu_mul in the matmul's last pass: the same bits as the two apart.
        gate_up = (torch.randn((3072, 576), generator=generator) * 576**-0.5).to(torch.bfloat16)
        fused = Linear(gate_up, 32, native)
        assert fused.gates
        for rows in (1, 17, 32, 33):
            want = native.silu_mul(native.linear(x[:rows], fused.own))
            assert torch.equal(fused.silu_mul(x[:rows], native), want)
            assert torch.equal(fused.silu_mul(x[:rows], TorchOps()), want)  # the ops only serve the fallback
        # q/k/v with rope on the 12 query and key heads in the matmul's last pass: the same bits as
        # the matmul and then rope (the 3 value heads stay as they came).
        turns = torch.rand((40, 32), generator=generator) * 50
        cos, sin = turns.cos().to(torch.bfloat16), turns.sin().to(torch.bfloat16)
        for rows in (1, 17, 32, 33):
            want = native.linear(x[:rows], packed)
            plain = want.clone()
            native.rope(want, 12, 64, cos[:rows], sin[:rows])
            out, qk = layer.rope(x[:rows], native, 12, 64, cos[:rows], sin[:rows])
            assert torch.equal(out, want) and torch.equal(qk, want[:, :768].view(rows, 12, 64))
            assert torch.equal(out[:, 768:], plain[:, 768:]) and not torch.equal(out[:, :768], plain[:, :768])
        with pytest.raises(ValueError, match="rotating"):
            native.linear(x, packed, rotate=(16, 64, cos, sin))  # 1024 columns of heads: more than the 960
        assert native.linear_rows(native.pack_linear(weight[:, :560])) == SMALL_LINEAR_ROWS  # 560 % 32 != 0
    else:
        assert native.linear_rows(packed) == SMALL_LINEAR_ROWS
        assert torch.equal(layer(x[:9]), torch.nn.functional.linear(x[:9], weight))  # oneDNN
        assert torch.equal(layer(x[:SMALL_LINEAR_ROWS]), native.linear(x[:SMALL_LINEAR_ROWS], packed))


def test_the_check_names_a_kernel_that_computes_something_else(library):
    broken = NativeOps(library, torch.bfloat16)
    broken._rope = lambda *args: None  # leaves queries and keys unrotated
    assert disagreement(broken) == "rope"
    broken = NativeOps(library, torch.float32)
    real = broken._norm
    broken._norm = lambda x, delta, w, out, n, h, eps: real(x, delta, w, out, n, h, eps * 1e6)  # a wrong epsilon
    assert disagreement(broken) == "add_norm"
    broken = NativeOps(library, torch.bfloat16)
    attention = broken._attention
    broken._attention = lambda *args: attention(*args[:-1], args[-1] * 2)  # a wrong softmax temperature
    assert disagreement(broken) == "attention"
    broken = NativeOps(library, torch.bfloat16)
    if broken.pack_linear(torch.zeros((32, 40), dtype=torch.bfloat16)) is not None:
        linear = broken._linear
        broken._linear = lambda x, stride, m, k, *rest: linear(x, stride, m, k - 2, *rest)  # drops an input pair
        assert disagreement(broken) == "linear"
    broken = NativeOps(library, torch.bfloat16)
    if broken._amx:
        tiles = broken._linear_amx
        broken._linear_amx = lambda x, stride, m, *rest: tiles(x, stride, m - 1, *rest)  # leaves a row out
        assert disagreement(broken) == "linear"
        broken = NativeOps(library, torch.bfloat16)
        gated = broken._linear_silu_amx
        broken._linear_silu_amx = lambda x, stride, m, k, *rest: gated(x, stride, m, k - 32, *rest)  # a wrong depth
        assert disagreement(broken) == "gated linear"
        broken = NativeOps(library, torch.bfloat16)
        turning = broken._linear_rope_amx
        broken._linear_rope_amx = lambda *args: turning(*args[:-2], 0, args[-1])  # rotates no head
        assert disagreement(broken) == "rotating linear"
    broken = NativeOps(library, torch.float32)
    row_max = broken._row_max
    broken._row_max = lambda x, stride, n, width, *out: row_max(x, stride, n, width - 1, *out)  # misses a column
    assert disagreement(broken) == "row_max"


def test_a_build_is_cached_by_source_flags_compiler_and_cpu(tmp_path, monkeypatch):
    first = build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial files left
    monkeypatch.setattr(kernels, "FLAGS", (*kernels.FLAGS, "-DOTHER"))
    assert build(tmp_path) != first


def test_without_a_compiler_the_step_keeps_torch_ops_and_says_why(tmp_path, monkeypatch):
    with pytest.raises(BuildError, match="no C compiler 'no-such-cc'"):
        build(tmp_path, compiler="no-such-cc")
    monkeypatch.setenv("CC", "no-such-cc")
    ops, reason = decode_ops(torch.bfloat16, torch.device("cpu"), True, tmp_path / "fresh")
    assert isinstance(ops, TorchOps) and "no-such-cc" in reason
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    ops, reason = decode_ops(torch.bfloat16, torch.device("cpu"), True, tmp_path / "other")
    assert isinstance(ops, TorchOps) and "failed" in reason


def test_native_ops_only_where_they_apply(tmp_path):
    assert decode_ops(torch.bfloat16, torch.device("cpu"), False, tmp_path)[1] == "RLHF_NATIVE_KERNELS=false"
    ops, reason = decode_ops(torch.float16, torch.device("cpu"), True, tmp_path)
    assert isinstance(ops, TorchOps) and "float16" in reason
    ops, reason = decode_ops(torch.float32, torch.device("cuda"), True, tmp_path)
    assert isinstance(ops, TorchOps) and "cuda" in reason
    ops, reason = decode_ops(torch.float32, torch.device("cpu"), True, tmp_path, group=65)
    assert isinstance(ops, TorchOps) and "at most 64 query heads" in reason
    ops, _ = decode_ops(torch.float32, torch.device("cpu"), True, tmp_path)
    assert ops.name == "native"
    with pytest.raises(ValueError, match="unit stride"):
        ops.silu_mul(torch.zeros((4, 8))[:, ::2])
    with pytest.raises(ValueError, match="CPU torch.float32"):
        ops.silu_mul(torch.zeros((4, 8), dtype=torch.bfloat16))
