"""The local backend: iteration-level (continuous) batching on a transformers model.

One engine thread owns the model. Each iteration it
  1. drops rows whose client went away or whose deadline passed,
  2. admits waiting requests from the head of a bounded FIFO queue while they
     fit (RLHF_MAX_BATCH rows, RLHF_KV_BUDGET_TOKENS, RLHF_MAX_PREFILL_TOKENS
     padded prompt tokens per step), prefills them in one
     left-padded batch (each distinct prompt once, however many samples or
     requests ask for it),
     samples their first token and writes their keys/values into free slots
     of the running batch's preallocated KV window (services/policy/kv.py),
  3. runs one decode step for every running row, samples each row with its
     own parameters and seeded generator, and removes finished rows.

So a new request joins at the next step and a finished one leaves at once,
as in TGI and vLLM, and neither copies the running batch's cache.

Memory is bounded by configuration, not luck: admission charges a cohort
rows x (longest prompt + max_new_tokens among its rows), an upper bound of
its cache, against RLHF_KV_BUDGET_TOKENS, and the KV window never allocates
more than that budget.

Isolation: one request never fails another. Parameters that cannot be sampled
are refused by validation (services/policy/params.py); a row whose scores are
not finite fails alone; a forward pass that raises is retried row by row (or
request by request for a prefill) and only the rows that fail again are
failed. The engine keeps serving. Outcomes are `StatusError`s
(services/common/errors.py): this module knows nothing of gRPC or HTTP.

Hot swap: rows are grouped in cohorts, one per model version. A new version
gets a new cohort that takes all new requests; the old cohort keeps decoding
its in-flight rows on the old weights until it is empty, then it (and its
model) is dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache

from services.common import openmp
from services.common.checkpoints import Manifest
from services.common.config import Settings
from services.common.dtypes import resolve_dtype
from services.common.errors import Status, StatusError
from services.common.hotswap import Loaded, ModelSwitcher
from services.common.logs import get_logger, log_fields
from services.common.metrics import BATCH_SIZE, GENERATED_TOKENS, PREFILL_PROMPTS, QUEUE_DEPTH
from services.common.models import load_causal_lm, pad_batch, position_ids_from_mask, resolve_device
from services.policy.fused import FusedDecoder, drop_packed_originals, ops_for, prepack_linears, unsupported
from services.policy.kernels import NativeOps, TorchOps
from services.policy.kv import KvWindow, use_gqa_sdpa
from services.policy.params import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, SampleOut, TokenOut
from services.policy.prompt_cache import PromptCache, stack, take_row
from services.policy.request import Finished, GenRequest, SampleDone, Token

log = get_logger(__name__)


class _Group:
    """The samples of one request: it finishes when all K are done."""

    def __init__(self, req: GenRequest, version: str):
        self.req = req
        self.version = version
        self.remaining = req.params.num_samples
        self.completion_tokens = 0
        self.prefill: list[TokenOut] = []  # the prompt's tokens, scored (params.prompt_logprobs)


class _Row:
    """One sample being decoded."""

    __slots__ = (
        "group",
        "req",
        "index",
        "seed",
        "generator",
        "ids",
        "text",
        "tokens",
        "horizon",
        "prefix_offset",
        "read_offset",
    )

    def __init__(self, group: _Group, index: int, seed: int, device: torch.device):
        self.group = group
        self.req = group.req
        self.index = index
        self.seed = seed
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.ids: list[int] = []
        self.text = ""
        self.tokens: list[TokenOut] = []
        # The most cache columns this row can ever need.
        self.horizon = len(self.req.prompt_ids) + self.req.params.max_new_tokens
        # Incremental detokenisation: ids[prefix_offset:read_offset] is the text already shown,
        # decoded again only as the context that makes the next piece's leading space right.
        self.prefix_offset = 0
        self.read_offset = 0


class Cohort:
    """The running rows of one model version and their KV window."""

    def __init__(
        self,
        loaded: Loaded,
        settings: Settings,
        held_elsewhere: Callable[[], int] = lambda: 0,
        prompt_cache_tokens: int = 0,
    ):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.rows: list[_Row] = []
        self.last: torch.Tensor | None = None  # [rows] the token to feed next
        self.eos_id = self.tokenizer.eos_token_id
        self.special_ids = set(self.tokenizer.all_special_ids)
        param = next(self.model.parameters())
        self.device = param.device
        budget = settings.kv_budget_tokens
        # The last shared prompt prefix and its keys/values per layer ([1, heads, tokens, dim]), kept for
        # later prefills (a chat template's system turn starts every prompt): this version's weights only.
        self.prefix: tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self.prompts = PromptCache(prompt_cache_tokens)  # whole prefilled prompts, for this version's weights
        self.kv = KvWindow(self.model, self.device, param.dtype, lambda: budget - held_elsewhere(), settings.max_batch)

    @property
    def version(self) -> str:
        return self.loaded.version

    @property
    def fused(self) -> FusedDecoder | None:
        """The model's fused decode step: LocalBackend's models, and a PPO trainer's rollout
        model, which builds a new one from its current weights before each rollout batch."""
        return getattr(self.model, "rlhf_fused", None)

    def kv_charge(self, extra_rows: int = 0, extra_horizon: int = 0) -> int:
        horizon = max([r.horizon for r in self.rows] + [extra_horizon, 0])
        return (len(self.rows) + extra_rows) * horizon

    def join(self, kv, mask: torch.Tensor, src: torch.Tensor, rows: list[_Row], last: torch.Tensor) -> None:
        """Add prefilled rows (row j is a sample of prompt src[j])."""
        self.kv.append_rows(kv, mask, src)
        self.rows = self.rows + list(rows)
        self.last = last if self.last is None else torch.cat([self.last, last])

    def keep(self, keep: list[int]) -> None:
        """Keep only these rows (freed slots are refilled from the end; nothing else moves)."""
        if len(keep) == len(self.rows):
            return
        order = self.kv.keep(keep)
        if not order:
            self.rows, self.last = [], None
            return
        self.rows = [self.rows[i] for i in order]
        self.last = self.last[torch.tensor(order, dtype=torch.long, device=self.last.device)]


class Engine:
    """Schedules requests onto the model; `submit` is thread-safe."""

    def __init__(self, settings: Settings, service: str = "policy", own_thread: bool = True, keep_prefix: bool = False):
        """`own_thread=False`: no scheduler thread; the caller runs the loop with `run_until_idle`
        (a trainer's rollouts: its own thread stays the process's one OpenMP pool, services/common/openmp.py).
        `keep_prefix`: keep a shared prompt prefix's keys/values, and whole prefilled prompts
        (RLHF_PROMPT_CACHE_TOKENS, services/policy/prompt_cache.py), for later prefills; only for models
        whose weights never change while served (LocalBackend's versions), never for a trainer's live policy."""
        self.settings = settings
        self.keep_prefix = keep_prefix
        self.service = service
        self._cv = threading.Condition()
        self._queue: deque[GenRequest] = deque()
        self._cohorts: list[Cohort] = []
        self._current: Cohort | None = None
        self._stopping = False
        self.steps = 0
        self.prefills = 0  # prefill forward passes (a batch of joining requests each)
        self.shared_prefix_tokens = 0  # prompt tokens not computed because a joining prompt shared them
        self.deduplicated_prompts = 0  # joining prompts not computed because another joining request had the same
        self.cached_prompts = 0  # joining prompts not computed because the cohort kept their prefill
        # The largest KV cache allocated so far (slots x columns, padding included), summed over cohorts.
        self.peak_cache_tokens = 0
        self._thread: threading.Thread | None = None
        if own_thread:
            self._thread = threading.Thread(target=self._run, name=f"{service}-engine", daemon=True)
            self._thread.start()

    # --- control ------------------------------------------------------------
    def set_model(self, loaded: Loaded) -> None:
        """Route new requests to `loaded`; in-flight rows finish on their own version."""
        with self._cv:

            def held_elsewhere() -> int:  # KV that other cohorts (older versions finishing) still hold
                return sum(c.kv.allocated_tokens for c in self._cohorts if c is not cohort)

            cache = self.settings.prompt_cache_tokens if self.keep_prefix else 0
            cohort = Cohort(loaded, self.settings, held_elsewhere, cache)
            self._cohorts.append(cohort)
            self._current = cohort
            self._cv.notify_all()

    @property
    def version(self) -> str:
        return self._current.version if self._current else ""

    def submit(self, req: GenRequest) -> None:
        with self._cv:
            if self._stopping or self._current is None:
                raise StatusError(Status.UNAVAILABLE, "the policy engine is not running")
            if len(self._queue) >= self.settings.max_queue:
                raise StatusError(
                    Status.RESOURCE_EXHAUSTED,
                    f"the request queue is full ({self.settings.max_queue} waiting, RLHF_MAX_QUEUE); retry later",
                )
            self._queue.append(req)
            QUEUE_DEPTH.labels(self.service).set(len(self._queue))
            req.on_cancel(self._wake)
            self._cv.notify_all()

    def stats(self) -> dict:
        with self._cv:
            return {
                "queued": len(self._queue),
                "running": sum(len(c.rows) for c in self._cohorts),
                "cohorts": [(c.version, len(c.rows)) for c in self._cohorts],
                "kv_charge": sum(c.kv_charge() for c in self._cohorts),
                "peak_cache_tokens": self.peak_cache_tokens,
                "prefills": self.prefills,
                "shared_prefix_tokens": self.shared_prefix_tokens,
                "deduplicated_prompts": self.deduplicated_prompts,
                "cached_prompts": self.cached_prompts,
            }

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for req in list(self._queue):
            req.fail(Status.UNAVAILABLE, "the server is shutting down")
        for cohort in self._cohorts:
            for row in cohort.rows:
                row.req.fail(Status.UNAVAILABLE, "the server is shutting down")

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # --- the loop -----------------------------------------------------------
    def _run(self) -> None:
        openmp.compute_thread(self.settings.torch_threads)  # this process's one OpenMP pool
        torch.set_grad_enabled(False)
        while self._step(wait=True):
            pass

    def run_until_idle(self) -> None:
        """Run the loop in the caller's thread until nothing is queued or decoding (`own_thread=False`)."""
        if self._thread is not None:
            raise RuntimeError("this engine runs its own scheduler thread")
        while self._step(wait=False):
            pass

    def _step(self, wait: bool) -> bool:
        """Admit, prefill and decode once. False once stopping, or when idle and not `wait`ing."""
        with self._cv:
            if self._stopping:
                return False
            self._purge_queue()
            joining = self._admit()
            busy = any(c.rows for c in self._cohorts)
            if not joining and not busy:
                if wait:
                    self._cv.wait(timeout=0.5)  # wakes on submit/cancel; times out to check deadlines
                return wait
            current = self._current
        with torch.inference_mode():
            if joining:
                self._prefill_isolated(current, joining)
            for cohort in list(self._cohorts):
                if cohort.rows:
                    self._decode_guarded(cohort)
        self.peak_cache_tokens = max(self.peak_cache_tokens, sum(c.kv.allocated_tokens for c in self._cohorts))
        with self._cv:
            self._cohorts = [c for c in self._cohorts if c.rows or c is self._current]
        return True

    def _prefill_isolated(self, cohort: Cohort, reqs: list[GenRequest]) -> None:
        """Prefill the joining requests together; if the forward pass raises, one by
        one, so a request that breaks it fails alone."""
        try:
            out = self._prefill_forward(cohort, reqs)
        except Exception as err:  # noqa: BLE001 - any failure of the model is isolated to the requests it touched
            log.exception("prefill failed", extra={"fields": {"version": cohort.version, "requests": len(reqs)}})
            if len(reqs) == 1:
                reqs[0].fail(Status.INTERNAL, f"generation failed: {err}")
            else:
                for req in reqs:
                    self._prefill_isolated(cohort, [req])
            return
        try:
            self._join(cohort, reqs, out)
        except Exception as err:  # noqa: BLE001 - the batch's KV bookkeeping broke: its rows cannot continue
            log.exception("joining the batch failed", extra={"fields": {"version": cohort.version}})
            for req in [*reqs, *(row.req for row in cohort.rows)]:
                req.fail(Status.INTERNAL, f"generation failed: {err}")
            cohort.keep([])

    def _decode_guarded(self, cohort: Cohort) -> None:
        """A decode step that raises is retried row by row; rows that fail again fail alone."""
        try:
            self._decode(cohort)
        except Exception as err:  # noqa: BLE001 - a failed step must not stop the engine or other cohorts
            log.exception("decode step failed", extra={"fields": {"version": cohort.version, "error": str(err)}})
            for row in cohort.rows:  # bookkeeping itself broke: only these rows can be affected
                row.req.fail(Status.INTERNAL, f"generation failed: {err}")
            cohort.keep([])

    def _purge_queue(self) -> None:
        now = time.monotonic()
        kept: deque[GenRequest] = deque()
        for req in self._queue:
            if req.cancelled:
                req.fail(Status.CANCELLED, "cancelled by the client")
            elif req.expired(now):
                req.fail(Status.DEADLINE_EXCEEDED, "deadline exceeded while queued")
            else:
                kept.append(req)
        self._queue = kept
        QUEUE_DEPTH.labels(self.service).set(len(kept))

    def _admit(self) -> list[GenRequest]:
        """Take requests from the head of the queue while they fit (FIFO: no overtaking)."""
        current = self._current
        if current is None:
            return []
        rows = sum(len(c.rows) for c in self._cohorts)
        others = sum(c.kv_charge() for c in self._cohorts if c is not current)
        add_rows, add_horizon, longest, joining, distinct = 0, 0, 0, [], set()
        while self._queue:
            req = self._queue[0]
            k = req.params.num_samples
            horizon = max(add_horizon, len(req.prompt_ids) + req.params.max_new_tokens)
            if rows + add_rows + k > self.settings.max_batch:
                break
            # The prefill is one left-padded batch: its cost is distinct prompts x the longest prompt.
            prompt = tuple(req.prompt_ids)
            padded = (len(distinct) + (prompt not in distinct)) * max(longest, len(req.prompt_ids))
            if joining and padded > self.settings.max_prefill_tokens:
                break
            if others + current.kv_charge(add_rows + k, horizon) > self.settings.kv_budget_tokens:
                break
            self._queue.popleft()
            joining.append(req)
            distinct.add(prompt)
            add_rows += k
            add_horizon = horizon
            longest = max(longest, len(req.prompt_ids))
        QUEUE_DEPTH.labels(self.service).set(len(self._queue))
        return joining

    # --- model work ---------------------------------------------------------
    def _prefill_forward(self, cohort: Cohort, reqs: list[GenRequest]):
        """The joining requests' prefills, each distinct prompt once whatever its K and however
        many requests send it, from the cohort's prompt cache where it kept that prompt; returns
        (keys/values, mask, last-position logits, prompt scores, each request's row of them)."""
        # Identical prompts (clients sending the same prompt at once, as K samples do) are computed once:
        # `where[i]` is request i's row of the prefill.
        rows: dict[tuple[int, ...], int] = {}
        where = [rows.setdefault(tuple(r.prompt_ids), len(rows)) for r in reqs]
        distinct = list(rows)
        self.deduplicated_prompts += len(reqs) - len(distinct)
        scored = [i for i, r in enumerate(reqs) if r.params.prompt_logprobs]
        # Prompt scores need the prompt's hidden states, which the cache does not keep.
        rescore = {distinct[where[i]] for i in scored}
        kept = {p: e for p in distinct if p not in rescore and (e := cohort.prompts.get(p)) is not None}
        self.cached_prompts += len(kept)
        missing = [p for p in distinct if p not in kept]
        for how, count in (
            ("computed", len(missing)),
            ("deduplicated", len(reqs) - len(distinct)),
            ("cached", len(kept)),
        ):
            PREFILL_PROMPTS.labels(self.service, how).inc(count)
        prefills: dict[int, list[TokenOut]] = {}
        if missing:
            kv, mask, logits, hidden = self._forward_prompts(cohort, [list(p) for p in missing], bool(scored))
            if hidden is not None:
                at = {p: j for j, p in enumerate(missing)}
                prefills = {
                    i: self._score_prompt(cohort, reqs[i].prompt_ids, hidden[at[distinct[where[i]]]]) for i in scored
                }
            if not kept and not cohort.prompts.limit:
                return kv, mask, logits, prefills, where
            fresh = {p: take_row(kv, mask, logits, j) for j, p in enumerate(missing)}
            for p, entry in fresh.items():  # entries are never written to: the cache and this join share them
                cohort.prompts.put(p, entry)
            if not kept:
                return kv, mask, logits, prefills, where
        else:
            fresh = {}
        kv, mask, logits = stack([kept[p] if p in kept else fresh[p] for p in distinct])
        return kv, mask, logits, prefills, where

    def _forward_prompts(self, cohort: Cohort, prompts: list[list[int]], scored: bool):
        """One left-padded forward over `prompts`: (keys/values, mask, last-position logits in
        fp32, the last layer's hidden states when `scored`, else None).

        Prompts that start alike (a chat template's system turn: about half of a
        short chat prompt) have that prefix computed once and shared: the rows'
        layout is then [prefix][padding][own tokens], which the mask and the
        position ids (real tokens only) make equivalent to a left-padded row.
        With `keep_prefix` the cohort keeps the last shared prefix, so later prefills
        (a single prompt too) that start with (a part of) it compute none of it."""
        pad_id = cohort.tokenizer.pad_token_id
        shared, head = self._shared_head(cohort, prompts) if not scored else (0, None)
        ids, mask = pad_batch([p[shared:] for p in prompts], pad_id, side="left")
        ids, mask = ids.to(cohort.device), mask.to(cohort.device)
        cache = None
        if shared:
            cache = DynamicCache(config=cohort.model.config)
            for layer, (k, v) in enumerate(head):
                cache.update(k[:, :, :shared], v[:, :, :shared], layer)
            cache.batch_repeat_interleave(len(prompts))
            mask = torch.cat([torch.ones((len(prompts), shared), dtype=mask.dtype, device=mask.device), mask], 1)
        self.prefills += 1
        out = cohort.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask)[:, shared:],
            past_key_values=cache,
            cache_position=torch.arange(shared, mask.shape[1], device=cohort.device) if shared else None,
            use_cache=True,
            logits_to_keep=1,  # never materialise [batch, prompt, vocab] logits
            output_hidden_states=scored,
        )
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return kv, mask, out.logits[:, -1].float(), out.hidden_states[-1] if scored else None

    def _shared_head(self, cohort: Cohort, prompts: list[list[int]]):
        """(tokens, keys/values) of the prefix these prompts share: the cohort's kept prefix
        as far as they all start with it, else their own common start, computed now and
        kept. (0, None) when shorter than RLHF_PREFILL_SHARED_PREFIX (0 = off)."""
        least = self.settings.prefill_shared_prefix
        if not least:
            return 0, None
        if self.keep_prefix and cohort.prefix is not None:
            tokens, head = cohort.prefix
            # The -1 (no token) lets the whole kept prefix count; every prompt still keeps a token of its own.
            reused = shared_prefix([tokens + [-1], *prompts])
            if reused >= least:
                self.shared_prefix_tokens += reused * len(prompts)
                return reused, head
        shared = shared_prefix(prompts) if len(prompts) > 1 else 0
        if shared < least:
            return 0, None
        ids = torch.tensor([prompts[0][:shared]], device=cohort.device)
        cache = cohort.model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
        head = [(layer.keys, layer.values) for layer in cache.layers]
        if self.keep_prefix:
            cohort.prefix = (prompts[0][:shared], head)
        self.shared_prefix_tokens += shared * (len(prompts) - 1)
        return shared, head

    def _join(self, cohort: Cohort, reqs: list[GenRequest], prefilled) -> None:
        """Sample the first token of every new row, and write the rows into the batch:
        row j of a request with K samples gets that prompt's keys/values."""
        kv, mask, logits, prefills, where = prefilled
        reps = torch.tensor([r.params.num_samples for r in reqs], device=cohort.device)
        src = torch.repeat_interleave(torch.tensor(where, device=cohort.device), reps)
        rows = []
        for n, req in enumerate(reqs):
            group = _Group(req, cohort.version)
            group.prefill = prefills.get(n, [])
            for i, seed in enumerate(req.params.sample_seeds()):
                rows.append(_Row(group, i, seed, cohort.device))
        next_ids, done = self._sample_and_advance(cohort, rows, logits[src])
        offset = len(cohort.rows)
        cohort.join(kv, mask, src, rows, next_ids)
        if any(done):  # finished on their first token (EOS, stop, or max_new_tokens=1), or failed
            cohort.keep([i for i in range(len(cohort.rows)) if i < offset or not done[i - offset]])

    @staticmethod
    def _score_prompt(cohort: Cohort, prompt_ids: list[int], hidden: torch.Tensor) -> list[TokenOut]:
        """log p(token_j | tokens_<j) for one prompt, from its last layer's
        hidden states (after the final norm; left padding, so the prompt is at
        the end): the unembedding runs on this prompt's positions only."""
        n = len(prompt_ids)
        logits = cohort.model.get_output_embeddings()(hidden[-n:-1]).float()
        targets = torch.tensor(prompt_ids[1:], device=logits.device)
        scores = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1).tolist()
        texts = cohort.tokenizer.batch_decode(
            [[t] for t in prompt_ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        special = cohort.special_ids
        return [
            TokenOut(t, texts[j], None if j == 0 else scores[j - 1], t in special) for j, t in enumerate(prompt_ids)
        ]

    def _forward_rows(self, cohort: Cohort, rows: slice) -> torch.Tensor:
        """One decode step's logits (the model's dtype) for cohort rows `rows`, keys/values written in place."""
        if cohort.fused is not None:
            return cohort.fused.step(cohort.last[rows], cohort.kv, rows)
        mask, positions = cohort.kv.decode_inputs(rows)
        out = cohort.model(
            input_ids=cohort.last[rows][:, None],
            attention_mask=mask,
            position_ids=positions,
            cache_position=torch.tensor([cohort.kv.width], device=cohort.device),
            past_key_values=cohort.kv,
            use_cache=True,
        )
        return out.logits[:, -1]

    def _decode(self, cohort: Cohort) -> None:
        self._drop_abandoned(cohort)
        if not cohort.rows:
            return
        n = len(cohort.rows)
        cohort.kv.reserve(n, right=1)
        failed: set[int] = set()
        try:
            logits = self._forward_rows(cohort, slice(0, n))
        except Exception as err:  # noqa: BLE001 - retried row by row below, so only the rows that break fail
            log_fields(log, logging.WARNING, "decode step failed; retrying row by row", error=str(err))
            parts: list[torch.Tensor | None] = []
            for i in range(n):
                try:
                    parts.append(self._forward_rows(cohort, slice(i, i + 1)))
                except Exception as row_err:  # noqa: BLE001 - this row alone fails
                    cohort.rows[i].req.fail(Status.INTERNAL, f"generation failed: {row_err}")
                    cohort.kv.forget_row(i)
                    failed.add(i)
                    parts.append(None)
            logits = self._stack_rows(parts, cohort)
        cohort.kv.commit()
        self.steps += 1
        BATCH_SIZE.labels(self.service).observe(n)
        GENERATED_TOKENS.labels(cohort.version).inc(n - len(failed))
        next_ids, done = self._sample_and_advance(cohort, cohort.rows, logits)
        cohort.last = next_ids
        if any(done):
            cohort.keep([i for i, d in enumerate(done) if not d])

    @staticmethod
    def _stack_rows(parts: list[torch.Tensor | None], cohort: Cohort) -> torch.Tensor:
        """Row-by-row logits back into one tensor; rows that failed become NaN (failed again, harmlessly)."""
        like = next((p for p in parts if p is not None), None)
        if like is None:
            vocab = cohort.model.get_output_embeddings().weight.shape[0]
            like = torch.empty((1, vocab), device=cohort.device)
        return torch.cat([p if p is not None else torch.full_like(like, float("nan")) for p in parts])

    def _drop_abandoned(self, cohort: Cohort) -> None:
        """Free the rows of cancelled or expired requests before spending a step on them."""
        now = time.monotonic()
        keep = []
        for i, row in enumerate(cohort.rows):
            req = row.req
            if req.cancelled:
                req.fail(Status.CANCELLED, "cancelled by the client")
            elif req.expired(now):
                req.fail(Status.DEADLINE_EXCEEDED, "deadline exceeded while generating")
            elif not req.closed:
                keep.append(i)
        cohort.keep(keep)

    # --- sampling -----------------------------------------------------------
    def _sample_and_advance(
        self, cohort: Cohort, rows: list[_Row], logits: torch.Tensor
    ) -> tuple[torch.Tensor, list[bool]]:
        fused = cohort.fused
        next_ids, logprobs, ok = sample(logits, rows, fused.ops if fused is not None else None)
        tokens = next_ids.tolist()
        done = []
        for i, row in enumerate(rows):
            if row.req.closed:  # failed earlier in this step (another of its samples), or by the client
                done.append(True)
            elif not ok[i]:
                log_fields(log, logging.WARNING, "non-finite scores; failing the request alone", index=row.index)
                row.req.fail(
                    Status.INTERNAL,
                    "generation failed: the model's scores for this request were not finite (NaN or inf)",
                )
                done.append(True)
            else:
                try:
                    done.append(self._advance(cohort, row, tokens[i], logprobs[i] if logprobs is not None else None))
                except Exception as err:  # noqa: BLE001 - e.g. a tokenizer error: this request alone fails
                    log.exception("advancing a row failed")
                    row.req.fail(Status.INTERNAL, f"generation failed: {err}")
                    done.append(True)
        return next_ids, done

    def _advance(self, cohort: Cohort, row: _Row, token: int, logprob: float | None) -> bool:
        """Append one token to a row: update its text, check stop conditions, emit."""
        req, params = row.req, row.req.params
        row.ids.append(token)
        lp = logprob if params.return_logprobs else None
        finish = None
        special = token in cohort.special_ids
        if token == cohort.eos_id:
            finish, piece = FINISH_EOS, ""
            shown = cohort.tokenizer.convert_ids_to_tokens(token)
        else:
            piece = _next_piece(cohort.tokenizer, row)
            old_len = len(row.text)
            if piece:
                row.text = row.text + piece
            if params.stop and piece:
                cut = _find_stop(row.text, params.stop, old_len)
                if cut is not None:
                    row.text = row.text[:cut]
                    piece = row.text[old_len:]
                    finish = FINISH_STOP
            shown = piece
        if finish is None and len(row.ids) >= params.max_new_tokens:
            finish = FINISH_LENGTH
        tok = TokenOut(token, shown, lp, special)
        if params.return_logprobs:
            row.tokens.append(tok)
        final = None
        if finish is not None:
            final = SampleOut(row.index, row.text, finish, len(row.ids), row.seed, list(row.tokens))
        if req.stream:
            req.emit(Token(row.index, tok, row.group.version, final))
        if final is None:
            return False
        group = row.group
        group.completion_tokens += len(row.ids)
        req.emit(SampleDone(final, group.version))
        group.remaining -= 1
        if group.remaining == 0:
            req.emit(Finished(group.version, len(req.prompt_ids), group.completion_tokens, group.prefill))
        return True


def shared_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens every prompt has in common, leaving each at least one of its own."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def _next_piece(tokenizer, row: _Row) -> str:
    """The text the newest token adds, decoding only a few tokens (not the whole row).

    The tokens already shown since `prefix_offset` are decoded again as context,
    so a piece's leading space comes out as it would in a full decode; an
    incomplete UTF-8 character (U+FFFD at the end) is held back until its last byte."""
    ids = row.ids
    prefix = tokenizer.decode(ids[row.prefix_offset : row.read_offset], skip_special_tokens=True)
    full = tokenizer.decode(ids[row.prefix_offset :], skip_special_tokens=True)
    if len(full) <= len(prefix) or full.endswith("\ufffd"):
        return ""
    row.prefix_offset, row.read_offset = row.read_offset, len(ids)
    return full[len(prefix) :]


def _find_stop(text: str, stops: tuple[str, ...], old_len: int) -> int | None:
    """End index of the earliest stop sequence that the newest text completed."""
    best = None
    for stop in stops:
        at = text.find(stop, max(0, old_len - len(stop) + 1))
        if at >= 0 and (best is None or at + len(stop) < best):
            best = at + len(stop)
    return best


# Top-p looks for its nucleus among each row's NUCLEUS_CANDIDATES likeliest tokens first: sorting the
# whole vocabulary (49k here) for every sampled row cost more than the model's decode step. A row whose
# nucleus is wider (a very flat distribution) falls back to the full sort, so the result is exact.
NUCLEUS_CANDIDATES = 256


def sample(
    logits: torch.Tensor, rows: list[_Row], ops: TorchOps | NativeOps | None = None
) -> tuple[torch.Tensor, list[float] | None, list[bool]]:
    """Pick each row's next token with that row's own parameters and generator; `ops`
    (the fused decode step's, services/policy/kernels.py) finds each row's maximum.

    Returns the tokens; if any row asked for them, each chosen token's
    log-probability under the model's unmodified distribution (what RLHF needs),
    before temperature, top-k, top-p and repetition penalty; and per row whether
    its scores were usable. A row whose logits or sampling distribution are
    unusable (NaN, +inf) gets token 0 and ok=False, and the caller fails its
    request alone: one row's NaN never reaches another row's draw.

    Vectorised except for one uniform draw per sampled row from that row's own
    generator (so a sample depends only on its seed, never on its batch), turned
    into tokens for all rows at once by inverse-CDF lookup.
    """
    n, device = logits.shape[0], logits.device
    # Logits come in the model's dtype: greedy picks the same token from bf16 scores as from their
    # exact fp32 upcast, so the plain greedy batch never copies them; the rest works in fp32.
    # A row's max is NaN with any NaN (max propagates it), +inf with any +inf, -inf when every
    # score is -inf (a token the model rules out is a legitimate -inf), finite otherwise: one
    # cheap pass checks each row. (logsumexp has the same cases but costs an exp per score;
    # it is computed only when some row asks for log-probabilities.)
    # Values and first indices of each row's max: torch's max is ~3x faster than its argmax here, and
    # the native kernel (AVX-512, rows split over the OpenMP team) ~10x faster than torch's max.
    top, first = (ops or TorchOps()).row_max(logits)
    ok = torch.isfinite(top)
    all_ok = bool(ok.all())
    if not all_ok:
        logits = torch.where(ok[:, None], logits, 0.0)  # keep the batch's arithmetic finite
    want_logprobs = any(r.req.params.return_logprobs for r in rows)
    if (
        all_ok
        and not want_logprobs
        and all(r.req.params.greedy and r.req.params.repetition_penalty == 1.0 for r in rows)
    ):
        return first, None, [True] * n  # the common plain greedy batch: no copies
    logits = logits.float()
    raw = logits if want_logprobs and any(r.req.params.repetition_penalty != 1.0 for r in rows) else None
    if raw is not None:
        logits = logits.clone()  # the penalty below must not change the reported log-probabilities
    for i, row in enumerate(rows):
        penalty = row.req.params.repetition_penalty
        if penalty != 1.0:
            seen = torch.tensor(row.req.prompt_ids + row.ids, dtype=torch.long, device=device).unique()
            values = logits[i, seen]
            logits[i, seen] = torch.where(values < 0, values * penalty, values / penalty)
    out = torch.zeros(n, dtype=torch.long, device=device)
    greedy = [i for i, r in enumerate(rows) if r.req.params.greedy]
    if greedy:
        out[greedy] = logits[greedy].argmax(-1)
    sampled = [i for i, r in enumerate(rows) if not r.req.params.greedy]
    if sampled:
        x = logits[sampled] / torch.tensor([rows[i].req.params.temperature for i in sampled], device=device)[:, None]
        ks = torch.tensor([rows[i].req.params.top_k for i in sampled], device=device)
        if bool((ks > 0).any()):
            kmax = min(int(ks.max()), x.shape[-1])
            top = x.topk(kmax, dim=-1).values
            kth = top.gather(1, (ks.clamp(1, kmax) - 1)[:, None])
            x = torch.where((ks > 0)[:, None] & (x < kth), float("-inf"), x)
        nucleus = [j for j, i in enumerate(sampled) if rows[i].req.params.top_p < 1.0]
        if nucleus:
            ps = torch.tensor([rows[sampled[j]].req.params.top_p for j in nucleus], device=device)
            x[nucleus] = _top_p(x[nucleus], ps)
        probs = x.softmax(-1)
        cdf = probs.cumsum(-1)
        total = cdf[:, -1]
        usable = torch.isfinite(total) & (total > 0)
        uniform = torch.stack([torch.rand((), generator=rows[i].generator, device=device) for i in sampled])
        pick = torch.searchsorted(cdf, (uniform * total)[:, None], right=True).squeeze(1)
        pick = pick.clamp(max=probs.shape[-1] - 1)
        # Rounding at the top of the CDF can land on a zero-probability token: take the likeliest then.
        zero = probs.gather(1, pick[:, None]).squeeze(1) <= 0
        if bool(zero.any()):
            pick = torch.where(zero, probs.argmax(-1), pick)
        index = torch.tensor(sampled, device=device)
        out[index] = torch.where(usable, pick, 0)
        ok[index] &= usable
    chosen = None
    if want_logprobs:
        lse = torch.logsumexp(logits if raw is None else raw, dim=-1)
        source = raw if raw is not None else logits
        chosen = (source.gather(1, out[:, None]).squeeze(1) - lse).tolist()
    return out, chosen, ok.tolist()


def _top_p(x: torch.Tensor, ps: torch.Tensor) -> torch.Tensor:
    """Keep each row's smallest set of likeliest tokens whose probability reaches ps
    (the first token always stays); the rest become -inf."""
    probs = x.softmax(-1)
    k = min(NUCLEUS_CANDIDATES, x.shape[-1])
    top, index = probs.topk(k, dim=-1)  # sorted, likeliest first
    if k < x.shape[-1] and not bool((top.sum(-1) >= ps).all()):
        top, index = probs.sort(dim=-1, descending=True)  # some nucleus is wider: the exact, slow way
    # Drop a token once the mass before it already reaches top_p.
    keep = (top.cumsum(-1) - top) < ps[:, None]
    kept = torch.full_like(x, float("-inf"))
    return kept.scatter(1, index, torch.where(keep, x.gather(1, index), float("-inf")))


def prepare_for_serving(model, settings: Settings):
    """This backend's own models only (others may be shared with a trainer, whose weights
    change): copy-free GQA attention, oneDNN-prepacked linears (bf16 on CPU, their plain
    weights then freed), and the fused decode step where the architecture has one
    (services/policy/fused.py)."""
    use_gqa_sdpa(model)
    packed = prepack_linears(model)
    if packed:
        log_fields(log, logging.INFO, "linear layers prepacked for oneDNN", layers=packed)
    why_not = unsupported(model) if settings.fused_decode else "RLHF_FUSED_DECODE=false"
    if why_not is None:
        ops, ops_reason = ops_for(model, settings)
        model.rlhf_fused = FusedDecoder(model, rows=settings.max_batch, ops=ops)
        log_fields(log, logging.INFO, "decode step", fused=True, kernels=ops.name, reason=ops_reason)
    else:
        log_fields(log, logging.INFO, "decode step", fused=False, reason=why_not)
    freed = drop_packed_originals(model)
    if freed:
        log_fields(log, logging.INFO, "plain weights of prepacked layers freed", mb=round(freed / 2**20))
    return model


class LocalBackend:
    """The continuous-batching engine fed by the hot-swapping model switcher
    (implements services/policy/backend.py's PolicyBackend)."""

    name = "local"

    def __init__(self, settings: Settings, service: str = "policy"):
        self.settings = settings
        self.engine = Engine(settings, service, keep_prefix=True)  # a version's weights never change
        device = resolve_device(settings.device)
        dtype, reason = resolve_dtype(settings.serve_dtype, device)
        self.dtype = dtype
        log_fields(log, logging.INFO, "serving dtype", dtype=str(dtype).removeprefix("torch."), reason=reason)

        def load(path: Path, manifest: Manifest):
            return prepare_for_serving(load_causal_lm(path, device=device, dtype=dtype), settings)

        def warmup(loaded: Loaded) -> None:
            # One tiny prefill + decode, so the first real request pays no first-call cost.
            with torch.inference_mode():
                ids = torch.tensor(
                    [loaded.tokenizer("Hello", add_special_tokens=False).input_ids or [0]], device=device
                )
                out = loaded.model(input_ids=ids, use_cache=True, logits_to_keep=1)
                loaded.model(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)

        self.switcher = ModelSwitcher(settings, "policy", service, load, warmup, on_switch=self.engine.set_model)

    def start(self, follow: bool = True) -> None:
        self.switcher.start(follow=follow)

    def stop(self) -> None:
        self.switcher.stop()
        self.engine.stop()

    @property
    def tokenizer(self):
        return self.switcher.current.tokenizer

    @property
    def version(self) -> str:
        return self.switcher.current.version

    def submit(self, req: GenRequest) -> None:
        self.engine.submit(req)

    def model_info(self) -> dict:
        return self.switcher.model_info(self.name)

    def pin(self, version: str) -> None:
        self.switcher.pin(version)
