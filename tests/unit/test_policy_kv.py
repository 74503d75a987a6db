"""The engine's KV window as a data structure: whatever joins, leaves, widening
and compaction happen, each live row's masked keys are exactly its tokens in
order (keys here are the token values themselves, one layer, one head, dim 1)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import torch

from services.policy.kv import KvWindow


def window(column_limit: int, max_slots: int) -> KvWindow:
    config = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=1, hidden_size=1, num_attention_heads=1)
    return KvWindow(SimpleNamespace(config=config), torch.device("cpu"), torch.float32, column_limit, max_slots)


def prompts_kv(prompts: list[list[float]]):
    """Left-padded [prompts, 1 head, width, 1] keys (and values = -keys), as a prefill returns them."""
    width = max(len(p) for p in prompts)
    k = torch.zeros((len(prompts), 1, width, 1))
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        k[i, 0, width - len(p) :, 0] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return [(k, -k), (2 * k, -2 * k)], mask


def check(w: KvWindow, expected: list[list[float]]) -> None:
    assert w.n == len(expected)
    assert w.allocated_tokens <= w.column_limit
    mask = w.live_mask()
    for i, tokens in enumerate(expected):
        for layer, scale in ((0, 1), (1, 2)):
            keys = w.k[layer][i, 0, w.start : w.end, 0][mask[i]]
            values = w.v[layer][i, 0, w.start : w.end, 0][mask[i]]
            assert keys.tolist() == [scale * t for t in tokens]
            assert values.tolist() == [-scale * t for t in tokens]
        # Every row's last token sits in the window's last column (a left-padded batch).
        assert bool(mask[i, -1])
    # What `whole` attends over beyond the window is masked, and finite: a masked NaN value
    # still makes attention NaN (its weight 0 times NaN).
    outside = torch.ones(w.columns, dtype=torch.bool)
    outside[w.start : w.end] = False
    assert not w.mask[: w.n, outside].any()
    for buf in w.k + w.v:
        assert torch.isfinite(buf[: w.n]).all()


def test_rows_keep_their_tokens_through_joins_leaves_widening_and_compaction():
    rng = random.Random(0)
    w = window(column_limit=96, max_slots=4)
    rows: list[list[float]] = []
    next_value = 1.0
    grew_left = compacted = 0
    for _ in range(120):
        if len(rows) < 4 and rng.random() < 0.5:  # a join, sometimes with a prompt longer than the window
            k = rng.choice([1, 2])
            length = rng.randint(1, 14)
            prompt = [next_value + j for j in range(length)]
            next_value += length
            kv, mask = prompts_kv([prompt])
            k = min(k, 4 - len(rows))
            grew_left += length > w.width and w.n > 0
            w.append_rows(kv, mask, torch.zeros(k, dtype=torch.long))
            rows += [list(prompt) for _ in range(k)]
        if len(rows) < 4 and rng.random() < 0.2:  # a row whose values are NaN joins and fails at once
            kv, mask = prompts_kv([[float("nan")] * rng.randint(1, 14)])
            w.append_rows(kv, mask, torch.zeros(1, dtype=torch.long))
            assert sorted(w.keep(list(range(len(rows))))) == list(range(len(rows)))
        # Some rows leave; rows at their horizon (23 tokens here) always do, as the engine's admission
        # guarantees rows x horizon <= the budget (4 x 24 = 96 columns with the next step's).
        full = [i for i, r in enumerate(rows) if len(r) >= 23]
        if full or (rows and rng.random() < 0.05):
            keep = [i for i in sorted(rng.sample(range(len(rows)), rng.randint(0, len(rows) - 1))) if i not in full]
            order = w.keep(keep)
            assert sorted(order) == keep
            rows = [rows[i] for i in order]
        check(w, rows)
        if not rows:
            continue
        # One decode step: every row appends one new token in the column after the window.
        start_before = w.start
        w.reserve(len(rows), right=1)
        compacted += w.start < start_before
        w.decode_inputs(slice(0, len(rows)))
        new = torch.tensor([next_value + i for i in range(len(rows))])
        next_value += len(rows)
        for layer, scale in ((0, 1), (1, 2)):
            key = (scale * new).reshape(len(rows), 1, 1, 1)
            w.update(key, -key, layer)
        w.commit()
        for i, row in enumerate(rows):
            row.append(float(new[i]))
        check(w, rows)
    assert grew_left and compacted  # both layout paths ran


def test_decode_inputs_count_only_real_tokens():
    w = window(column_limit=64, max_slots=4)
    kv, mask = prompts_kv([[1.0, 2.0, 3.0], [4.0]])
    w.append_rows(kv, mask, torch.tensor([0, 1, 1]))  # prompt 0 once, prompt 1 twice (K samples)
    w.reserve(3, right=1)
    attn, positions = w.decode_inputs(slice(0, 3))
    assert positions.squeeze(-1).tolist() == [3, 1, 1]
    assert attn.shape == (3, 1, 1, 4)
    assert attn[:, 0, 0].tolist() == [[True] * 4, [False, False, True, True], [False, False, True, True]]
