"""The decode-step attention (services/policy/kv.py `decode_attention`): one query
token per row, grouped K/V heads read in place, against PyTorch's sdpa."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.policy.kv import COLUMN_BUCKET, _gqa_sdpa, decode_attention


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch, heads, kv_heads, columns, dim = 5, 9, 3, 23, 64  # SmolLM2-135M's head layout
    q = torch.randn(batch, heads, 1, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, columns, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, columns, dim, generator=g).to(dtype)
    mask = torch.ones(batch, 1, 1, columns, dtype=torch.bool)
    for row in range(batch):
        mask[row, :, :, : 2 * row] = False  # left padding of different widths
    return q, k, v, mask


def _reference(q, k, v, mask, scale=None):
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


@pytest.mark.parametrize("kind", ["bool", "additive", "per-head"])
def test_matches_sdpa_with_each_mask_form(kind):
    q, k, v, mask = _inputs(torch.float32)
    if kind == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    elif kind == "per-head":
        mask = mask.expand(-1, q.shape[1], -1, -1).clone()
        mask[:, 4, :, 5] = False  # one head of every row skips one more column
    got = decode_attention(q, k, v, mask, 0.125)
    assert got.shape == (q.shape[0], 1, q.shape[1], q.shape[3])
    torch.testing.assert_close(got, _reference(q, k, v, mask, 0.125), atol=1e-5, rtol=1e-5)


def test_bf16_within_rounding_and_gqa_sdpa_routes_decode_steps_to_it():
    q, k, v, mask = _inputs(torch.bfloat16, seed=1)
    want = _reference(q.float(), k.float(), v.float(), mask)
    module = torch.nn.Module()
    got, _ = _gqa_sdpa(module, q, k, v, mask, scaling=None)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    assert torch.equal(got, decode_attention(q, k, v, mask, None))


def test_key_length_is_padded_to_a_bucket_so_few_matmul_shapes_occur(monkeypatch):
    """oneDNN caches a kernel per bf16 matmul shape (~1 MB each); a window one column
    longer every step would add one per step without the bucket."""
    shapes = []
    matmul = torch.matmul

    def recording(a, b):
        shapes.append(tuple(b.shape))
        return matmul(a, b)

    monkeypatch.setattr(torch, "matmul", recording)
    q, k, v, mask = _inputs(torch.float32)
    for columns in range(20, 23):
        decode_attention(q, k[:, :, :columns], v[:, :, :columns], mask[..., :columns], None)
    assert {s[-1] for s in shapes[0::2]} == {COLUMN_BUCKET}  # q @ k^T: [.., D, L]
    assert {s[-2] for s in shapes[1::2]} == {COLUMN_BUCKET}  # weights @ v: [.., L, D]
