"""A preallocated KV cache for one cohort of decoding rows: joins and leaves copy
(almost) nothing, and a decode step appends in place.

Layout, per layer: keys and values in buffers of [slots, kv_heads, columns,
head_dim]. Row i of the running batch lives in slot i. All rows share one
window of columns [start, end): each row's tokens are right-aligned in it (a
left-padded batch), `mask` marks real tokens, and position ids count only real
tokens, so padding never changes a row's result. A decode step writes every
row's new key/value at column `end`, in place, and the model attends over a
view of the window; transformers' DynamicCache instead concatenates (copies)
the whole cache at every step.

- A join writes the new rows' prefilled keys/values into free slots at the
  window's right end; only a prompt longer than the window widens it.
- A leave moves the last live row into the freed slot (one row's window, not
  the whole cache), and leading columns that became all padding are dropped by
  moving `start`: no copy.
- When `end` reaches the buffer's last column, the window is moved back to
  column 0 (one copy per `columns - width` steps), or the buffer grows.
- Buffers stay within RLHF_KV_BUDGET_TOKENS less what other cohorts (an old
  model version finishing its rows) hold; they only exceed it by what the
  admitted rows need, which admission keeps within the budget's charge.

The object is handed to the model as `past_key_values`: transformers' Llama
calls only `update(key, value, layer_idx, cache_kwargs)` when the 4D mask,
position ids and cache position are given, which the engine always does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

GQA_SDPA = "rlhf_gqa_sdpa"
COLUMN_BUCKET = 64  # decode attention pads the key length to a multiple of this (see decode_attention)


def _gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' sdpa attention, except that grouped-query attention never copies K/V.

    transformers repeats each K/V head for its query heads (a copy of the whole
    cache, per layer and step) whenever a mask is given; PyTorch's sdpa reads
    the groups in place with `enable_gqa`, with or without a mask: about 4x
    faster per layer here for a batch of 32. Same arithmetic, same results."""
    if attention_mask is not None and attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    if query.shape[2] == 1 and not (dropout and module.training):
        return decode_attention(query, key, value, attention_mask, scaling), None
    if is_causal is None:
        is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=is_causal,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def decode_attention(query, key, value, attention_mask, scaling):
    """One new token per row: two batched matmuls and a softmax in fp32, each query
    head group reading its K/V head in place. PyTorch's CPU sdpa runs its flash kernel
    for this shape too, tiled for long queries: measured here (32 rows, 9 heads over 3
    K/V heads, 110 columns, bf16) 1.9 ms per layer against 0.24 ms for this; in the
    engine, 40% of a 32-row decode step. Same arithmetic up to rounding (bf16: within
    4e-3). With the key length padded to a bucket (a copy of K and V, which bounds the
    kernels oneDNN caches: +80 MB over 800 lengths instead of +780 MB), a 32-row step
    measured 92.7 ms with sdpa, 66.3 ms unpadded and 79.7 ms padded."""
    batch, heads, _, dim = query.shape
    kv_heads, columns = key.shape[1], key.shape[2]
    scale = dim**-0.5 if scaling is None else scaling
    # oneDNN builds and caches a kernel per matmul shape (~1 MB each here), and the window
    # grows by a column per step: pad to a multiple of COLUMN_BUCKET so few shapes ever occur.
    padded = -columns % COLUMN_BUCKET
    if padded:
        key, value = F.pad(key, (0, 0, 0, padded)), F.pad(value, (0, 0, 0, padded))
        if attention_mask is None:
            attention_mask = torch.ones((batch, 1, 1, columns), dtype=torch.bool, device=query.device)
        fill = False if attention_mask.dtype == torch.bool else float("-inf")
        attention_mask = F.pad(attention_mask, (0, padded), value=fill)
        columns += padded
    group = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, group, dim)  # [B, KV, G, D]: no K/V copy
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scale  # [B, KV, G, L]
    if attention_mask is not None:
        per_head = attention_mask.shape[1] != 1  # [B, H, 1, L] rather than [B, 1, 1, L]
        mask = attention_mask.reshape(batch, kv_heads if per_head else 1, group if per_head else 1, columns)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    weights = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(weights, value)  # [B, KV, G, D]
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous()  # [B, 1, H, D], like sdpa's path


def use_gqa_sdpa(model) -> None:
    """Switch a transformers model that uses sdpa to the copy-free GQA variant above."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(GQA_SDPA, _gqa_sdpa)
    # The same masks as sdpa (without a registered mask builder transformers would pass no mask at all).
    AttentionMaskInterface.register(GQA_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(GQA_SDPA)


class KvWindow:
    def __init__(
        self, model, device: torch.device, dtype: torch.dtype, column_limit: int | Callable[[], int], max_slots: int
    ):
        config = model.config
        self.layers = config.num_hidden_layers
        self.heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.device, self.dtype = device, dtype
        # slots x columns may not exceed this: RLHF_KV_BUDGET_TOKENS, less what other cohorts hold during a swap
        self._column_limit = column_limit if callable(column_limit) else (lambda: column_limit)
        self.max_slots = max_slots  # RLHF_MAX_BATCH
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.mask = torch.zeros((0, 0), dtype=torch.bool, device=device)
        self.n = 0  # live rows, in slots [0, n)
        self.start = self.end = 0
        self._rows: slice | torch.Tensor = slice(0, 0)  # which slots the model's next forward covers

    # --- sizes --------------------------------------------------------------
    @property
    def slots(self) -> int:
        return self.mask.shape[0]

    @property
    def columns(self) -> int:
        return self.mask.shape[1]

    @property
    def width(self) -> int:
        return self.end - self.start

    @property
    def column_limit(self) -> int:
        return self._column_limit()

    @property
    def allocated_tokens(self) -> int:
        return self.slots * self.columns

    def live_mask(self) -> torch.Tensor:
        return self.mask[: self.n, self.start : self.end]

    # --- layout -------------------------------------------------------------
    def _relayout(self, slots: int, columns: int, offset: int) -> None:
        """Move the live window to columns [offset, offset + width) of buffers of
        slots x columns (new buffers when the size changes, else in place)."""
        n, width, start, end = self.n, self.width, self.start, self.end
        if slots == self.slots and columns == self.columns:
            if offset != start:
                for bufs in (self.k, self.v):
                    for b in bufs:
                        b[:n, :, offset : offset + width] = b[:n, :, start:end].clone()
                        b[:n, :, :offset] = 0  # a live slot holds zeros outside its window (see `whole`)
                        b[:n, :, offset + width :] = 0
                window = self.mask[:n, start:end].clone()
                self.mask[:n] = False
                self.mask[:n, offset : offset + width] = window
        else:
            shape = (slots, self.heads, columns, self.head_dim)
            k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
            v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
            mask = torch.zeros((slots, columns), dtype=torch.bool, device=self.device)
            if n and width:
                for new, old in zip(k + v, self.k + self.v, strict=True):
                    new[:n, :, offset : offset + width] = old[:n, :, start:end]
                mask[:n, offset : offset + width] = self.mask[:n, start:end]
            self.k, self.v, self.mask = k, v, mask
        self.start, self.end = offset, offset + width

    def reserve(self, slots: int, left_width: int = 0, right: int = 0) -> None:
        """Make room for `slots` rows, a window at least `left_width` wide ending at
        the current `end` (a join's prompt), and `right` more columns after `end`
        (a decode step's new token)."""
        grow_left = max(0, left_width - self.width)
        total = self.width + grow_left + right
        if slots <= self.slots and self.start >= grow_left and self.end + right <= self.columns:
            self._expose(grow_left)
            return
        if slots <= self.slots and total <= self.columns:
            self._relayout(self.slots, self.columns, grow_left)  # move the window back to the left edge
        else:
            # Grow slots geometrically (a busy batch reallocates a few times, not at every join),
            # within RLHF_MAX_BATCH and the budget; columns to the next multiple of COLUMN_BUCKET,
            # so that `whole` attends over few distinct lengths with little padding.
            limit = self.column_limit
            new_slots = max(slots, min(2 * self.slots, self.max_slots, limit // total))
            columns = max(total, min(-(-total // COLUMN_BUCKET) * COLUMN_BUCKET, limit // max(1, new_slots)))
            self._relayout(new_slots, columns, grow_left)
        self._expose(grow_left)

    def _expose(self, grow_left: int) -> None:
        """Open `grow_left` columns left of the window, as padding for every live row."""
        if grow_left:
            a, b = self.start - grow_left, self.start
            self.mask[:, a:b] = False
            for buf in self.k + self.v:
                buf[:, :, a:b] = 0  # stale values could be non-finite; masked columns must be finite
            self.start = a

    def append_rows(self, kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, src: torch.Tensor) -> None:
        """Add len(src) rows; row j copies prompt src[j] of the prefill's keys/values
        ([prompts, heads, width, dim], left-padded like `mask`)."""
        rows, width = len(src), mask.shape[1]
        if self.n == 0:
            self.start = self.end = 0
            if kv[0][0].dtype != self.dtype:  # e.g. a model run under bf16 autocast returns bf16 keys
                self.dtype, self.k, self.v = kv[0][0].dtype, [], []
                self.mask = self.mask[:0, :0]
        self.reserve(self.n + rows, left_width=width)
        a, b = self.n, self.n + rows
        lo = self.end - width
        self.mask[a:b] = False
        self.mask[a:b, lo : self.end] = mask[src].bool()
        for layer, (k, v) in enumerate(kv):
            self.k[layer][a:b] = 0  # the whole slot: a previous row's values (NaN, if it failed) must go
            self.v[layer][a:b] = 0
            self.k[layer][a:b, :, lo : self.end] = k[src]
            self.v[layer][a:b, :, lo : self.end] = v[src]
        self.n = b

    def keep(self, keep: list[int]) -> list[int]:
        """Keep only these rows. Returns the new order: slot i now holds old row order[i].
        Freed slots are refilled with the last live rows (one row's copy each)."""
        if not keep:
            self.n, self.start, self.end = 0, 0, 0
            return []
        kept = set(keep)
        n = len(keep)
        order = list(range(self.n))
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in range(n, self.n) if i in kept]
        for hole, mover in zip(holes, movers, strict=True):
            for buf in self.k + self.v:
                buf[hole] = buf[mover]  # the whole slot, so that nothing of the row that left remains
            self.mask[hole] = self.mask[mover]
            order[hole] = mover
        self.n = n
        used = self.live_mask().any(0).nonzero()
        if len(used):
            self.start += int(used[0])
        return order[:n]

    def forget_row(self, row: int) -> None:
        """Zero one row's slot (its model output was non-finite: it must not poison a later user of the slot)."""
        for buf in self.k + self.v:
            buf[row] = 0

    # --- the model's view ---------------------------------------------------
    def decode_inputs(self, rows: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(4D attention mask, position ids) for one decode step of `rows`; the
        new token goes to column `end` (call reserve(n, right=1) first)."""
        self._rows = rows
        mask = self.mask[rows, self.start : self.end]
        positions = self.positions(rows)
        full = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=torch.bool, device=self.device)], 1)
        return full[:, None, None, :], positions

    def positions(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """[rows, 1] position ids of the fed tokens: the real tokens before them."""
        return self.mask[rows, self.start : self.end].sum(-1, keepdim=True)

    def whole(self, layer: int, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [rows, heads, columns, dim] of every column of the buffers: a
        contiguous view, unlike the window's, so attention over it copies nothing (its
        batched matmul would copy a strided view, and padding the window to a bucket copies
        too). Columns outside the window are masked by `whole_mask`; they hold zeros or the
        row's own earlier values, never another row's: joins zero the slot, leaves move whole
        slots, and relayouts zero what is outside the window. Write the step's column first
        (`write`)."""
        return self.k[layer][rows], self.v[layer][rows]

    def whole_mask(self, rows: slice) -> torch.Tensor:
        """[rows, columns]: True where `whole`'s attention may look, the step's new column included."""
        mask = self.mask[rows].clone()
        mask[:, self.end] = True
        return mask

    def write(self, layer: int, rows: slice | torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write a decode step's key and value [rows, heads, dim] at column `end`."""
        self.k[layer][rows, :, self.end] = key
        self.v[layer][rows, :, self.end] = value

    def commit(self) -> None:
        """The decode step succeeded for every live row: the new column becomes part of the window."""
        self.mask[: self.n, self.end] = True
        self.end += 1

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs=None):
        rows, col = self._rows, self.end
        self.write(layer_idx, rows, key[:, :, -1], value[:, :, -1])
        return (
            self.k[layer_idx][rows, :, self.start : col + 1],
            self.v[layer_idx][rows, :, self.start : col + 1],
        )
