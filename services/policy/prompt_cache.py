"""Prefilled prompts kept for reuse: a prompt that comes back (a retry, best-of-n
over several requests, an evaluation set, clients that share a template and a
question) joins the batch from its kept keys/values and last-position scores
instead of another prefill forward.

This is the exact-prompt case of vLLM's automatic prefix caching and SGLang's
radix cache: the key is the whole token sequence, so a hit needs no partial
prefill (prompts that only start alike share their prefix through
RLHF_PREFILL_SHARED_PREFIX instead). Entries belong to one model version's
cohort (services/policy/engine.py): a hot swap starts with an empty cache, and a
trainer's live policy, whose weights change, keeps none.

Bounded by RLHF_PROMPT_CACHE_TOKENS cached columns (the least recently used
entry goes first). A column costs layers x 2 x K/V heads x head size values:
23 KB in bf16 for SmolLM2-135M, so the default 4096 is about 94 MB (188 MB in
fp32), plus one row of fp32 scores (196 KB) per entry.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class Prefilled:
    """One prompt's prefill: per layer keys/values [heads, columns, dim], which columns hold
    real tokens (a kept shared prefix leaves a gap of padding inside), and its scores for the
    next token (fp32)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor
    logits: torch.Tensor

    @property
    def columns(self) -> int:
        return self.mask.shape[0]


def take_row(kv, mask: torch.Tensor, logits: torch.Tensor, row: int) -> Prefilled:
    """Row `row` of a left-padded prefill batch as its own copy, without the leading padding."""
    first = int(mask[row].nonzero()[0])
    return Prefilled(
        [(k[row, :, first:].clone(), v[row, :, first:].clone()) for k, v in kv],
        mask[row, first:].bool(),
        logits[row].clone(),
    )


def stack(entries: list[Prefilled]):
    """Entries as one left-padded batch: (keys/values per layer [n, heads, width, dim], mask
    [n, width], scores [n, vocab]), the form a prefill forward returns."""
    width = max(e.columns for e in entries)
    n = len(entries)
    mask = torch.zeros((n, width), dtype=torch.bool, device=entries[0].mask.device)
    for i, e in enumerate(entries):
        mask[i, width - e.columns :] = e.mask
    kv = []
    for layer, (k0, _) in enumerate(entries[0].kv):
        heads, _, dim = k0.shape
        keys = k0.new_zeros((n, heads, width, dim))
        values = k0.new_zeros((n, heads, width, dim))
        for i, e in enumerate(entries):
            k, v = e.kv[layer]
            keys[i, :, width - e.columns :] = k
            values[i, :, width - e.columns :] = v
        kv.append((keys, values))
    return kv, mask, torch.stack([e.logits for e in entries])


class PromptCache:
    """Least-recently-used prefills by exact prompt token ids, up to `limit` columns in all
    (0 = keep none)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._entries: OrderedDict[tuple[int, ...], Prefilled] = OrderedDict()
        self.columns = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, prompt: tuple[int, ...]) -> Prefilled | None:
        entry = self._entries.get(prompt)
        if entry is not None:
            self._entries.move_to_end(prompt)
        return entry

    def put(self, prompt: tuple[int, ...], entry: Prefilled) -> None:
        if entry.columns > self.limit:
            return
        old = self._entries.pop(prompt, None)
        if old is not None:
            self.columns -= old.columns
        self._entries[prompt] = entry
        self.columns += entry.columns
        while self.columns > self.limit:
            _, dropped = self._entries.popitem(last=False)
            self.columns -= dropped.columns
