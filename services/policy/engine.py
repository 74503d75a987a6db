"""The local backend: iteration-level (continuous) batching on a transformers model.

One engine thread owns the model. Each iteration it
  1. drops rows whose client went away or whose deadline passed,
  2. admits waiting requests from the head of a bounded FIFO queue while they
     fit (RLHF_MAX_BATCH rows, RLHF_KV_BUDGET_TOKENS), prefills them in one
     left-padded batch, samples their first token and merges their KV cache
     into the running batch,
  3. runs one decode step for every running row, samples each row with its
     own parameters and seeded generator, and removes finished rows.

So a new request joins at the next step and a finished one leaves at once,
as in TGI and vLLM. The running batch is a left-padded KV cache: each row's
tokens are right-aligned, the attention mask marks real tokens, and position
ids count only real tokens, so padding never changes a row's result.

Memory is bounded by configuration, not luck: admission charges a cohort
rows x (longest prompt + max_new_tokens among its rows), an upper bound of
its padded cache, against RLHF_KV_BUDGET_TOKENS.

Hot swap: rows are grouped in cohorts, one per model version. A new version
gets a new cohort that takes all new requests; the old cohort keeps decoding
its in-flight rows on the old weights until it is empty, then it (and its
model) is dropped.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import grpc
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from services.common.config import Settings
from services.common.hotswap import Loaded
from services.common.logs import get_logger
from services.common.metrics import BATCH_SIZE, GENERATED_TOKENS, QUEUE_DEPTH
from services.common.models import pad_batch, position_ids_from_mask
from services.policy.params import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, SampleOut, ServingError, TokenOut
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

    __slots__ = ("group", "req", "index", "seed", "generator", "ids", "text", "tokens", "horizon")

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


class Cohort:
    """The running rows of one model version and their shared KV cache."""

    def __init__(self, loaded: Loaded):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, columns], 1 = real token
        self.last: torch.Tensor | None = None  # [rows] the token to feed next
        self.eos_id = self.tokenizer.eos_token_id
        self.special_ids = set(self.tokenizer.all_special_ids)
        self.device = next(self.model.parameters()).device

    @property
    def version(self) -> str:
        return self.loaded.version

    def kv_charge(self, extra_rows: int = 0, extra_horizon: int = 0) -> int:
        horizon = max([r.horizon for r in self.rows] + [extra_horizon, 0])
        return (len(self.rows) + extra_rows) * horizon

    def merge(
        self, kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, rows: list[_Row], last: torch.Tensor
    ) -> None:
        """Add prefilled rows, left-padding whichever side is shorter."""
        if not self.rows:
            self.cache, self.mask, self.rows, self.last = DynamicCache(ddp_cache_data=kv), mask, list(rows), last
            return
        old = self.cache.to_legacy_cache()
        width = max(self.mask.shape[1], mask.shape[1])

        def left_pad(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
            missing = width - t.shape[-dim_from_end]
            if missing == 0:
                return t
            pad = [0, 0] * (dim_from_end - 1) + [missing, 0]
            return F.pad(t, pad)

        merged = [
            (torch.cat([left_pad(ko, 2), left_pad(kn, 2)]), torch.cat([left_pad(vo, 2), left_pad(vn, 2)]))
            for (ko, vo), (kn, vn) in zip(old, kv)
        ]
        self.cache = DynamicCache(ddp_cache_data=merged)
        self.mask = torch.cat([left_pad(self.mask, 1), left_pad(mask, 1)])
        self.rows = self.rows + list(rows)
        self.last = torch.cat([self.last, last])

    def keep(self, keep: list[int]) -> None:
        """Keep only these rows, and drop cache columns that became all padding."""
        if not keep:
            self.rows, self.cache, self.mask, self.last = [], None, None, None
            return
        if len(keep) == len(self.rows):
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask[idx]
        first = int(torch.nonzero(mask.sum(0))[0])
        kv = [(k[idx, :, first:], v[idx, :, first:]) for k, v in self.cache.to_legacy_cache()]
        self.cache = DynamicCache(ddp_cache_data=kv)  # copies, so the old cache is freed
        self.mask = mask[:, first:]
        self.rows = [self.rows[i] for i in keep]
        self.last = self.last[idx]


class Engine:
    """Schedules requests onto the model; `submit` is thread-safe."""

    def __init__(self, settings: Settings, service: str = "policy"):
        self.settings = settings
        self.service = service
        self._cv = threading.Condition()
        self._queue: deque[GenRequest] = deque()
        self._cohorts: list[Cohort] = []
        self._current: Cohort | None = None
        self._stopping = False
        self.steps = 0
        # The largest KV cache held so far, rows x columns (padding included), summed over cohorts.
        self.peak_cache_tokens = 0
        self._thread = threading.Thread(target=self._run, name=f"{service}-engine", daemon=True)
        self._thread.start()

    # --- control ------------------------------------------------------------
    def set_model(self, loaded: Loaded) -> None:
        """Route new requests to `loaded`; in-flight rows finish on their own version."""
        with self._cv:
            cohort = Cohort(loaded)
            self._cohorts.append(cohort)
            self._current = cohort
            self._cv.notify_all()

    @property
    def version(self) -> str:
        return self._current.version if self._current else ""

    def submit(self, req: GenRequest) -> None:
        with self._cv:
            if self._stopping or self._current is None:
                raise ServingError(grpc.StatusCode.UNAVAILABLE, "the policy engine is not running")
            if len(self._queue) >= self.settings.max_queue:
                raise ServingError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
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
            }

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        for req in list(self._queue):
            req.fail(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        for cohort in self._cohorts:
            for row in cohort.rows:
                row.req.fail(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # --- the loop -----------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                if self._stopping:
                    return
                self._purge_queue()
                joining = self._admit()
                busy = any(c.rows for c in self._cohorts)
                if not joining and not busy:
                    self._cv.wait(timeout=0.5)  # wakes on submit/cancel; times out to check deadlines
                    continue
                current = self._current
            if joining:
                self._guarded(current, self._prefill, joining)
            for cohort in list(self._cohorts):
                if cohort.rows:
                    self._guarded(cohort, self._decode)
            with self._cv:
                self._cohorts = [c for c in self._cohorts if c.rows or c is self._current]

    def _guarded(self, cohort: Cohort, fn, *args) -> None:
        """A failed forward pass fails the requests it touched, never the engine."""
        try:
            with torch.inference_mode():
                fn(cohort, *args)
        except Exception as err:
            log.exception("generation step failed", extra={"fields": {"version": cohort.version, "error": str(err)}})
            reqs = {id(r.req): r.req for r in cohort.rows}
            for req in args[0] if args else []:
                reqs[id(req)] = req
            for req in reqs.values():
                req.fail(grpc.StatusCode.INTERNAL, f"generation failed: {err}")
            cohort.keep([])

    def _purge_queue(self) -> None:
        now = time.monotonic()
        kept: deque[GenRequest] = deque()
        for req in self._queue:
            if req.cancelled:
                req.fail(grpc.StatusCode.CANCELLED, "cancelled by the client")
            elif req.expired(now):
                req.fail(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while queued")
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
        add_rows, add_horizon, joining = 0, 0, []
        while self._queue:
            req = self._queue[0]
            k = req.params.num_samples
            horizon = max(add_horizon, len(req.prompt_ids) + req.params.max_new_tokens)
            if rows + add_rows + k > self.settings.max_batch:
                break
            if others + current.kv_charge(add_rows + k, horizon) > self.settings.kv_budget_tokens:
                break
            self._queue.popleft()
            joining.append(req)
            add_rows += k
            add_horizon = horizon
        QUEUE_DEPTH.labels(self.service).set(len(self._queue))
        return joining

    # --- model work ---------------------------------------------------------
    def _prefill(self, cohort: Cohort, reqs: list[GenRequest]) -> None:
        """One left-padded forward over the new prompts; each prompt once, then its
        cache row is repeated for its K samples."""
        pad_id = cohort.tokenizer.pad_token_id
        ids, mask = pad_batch([r.prompt_ids for r in reqs], pad_id, side="left")
        ids, mask = ids.to(cohort.device), mask.to(cohort.device)
        scored = [i for i, r in enumerate(reqs) if r.params.prompt_logprobs]
        out = cohort.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=True,
            logits_to_keep=1,  # never materialise [batch, prompt, vocab] logits
            output_hidden_states=bool(scored),
        )
        prefills = {i: self._score_prompt(cohort, reqs[i].prompt_ids, out.hidden_states[-1][i]) for i in scored}
        reps = torch.tensor([r.params.num_samples for r in reqs], device=cohort.device)
        logits = out.logits[:, -1].float().repeat_interleave(reps, 0)
        kv = [
            (k.repeat_interleave(reps, 0), v.repeat_interleave(reps, 0))
            for k, v in out.past_key_values.to_legacy_cache()
        ]
        mask = mask.repeat_interleave(reps, 0)
        rows = []
        for n, req in enumerate(reqs):
            group = _Group(req, cohort.version)
            group.prefill = prefills.get(n, [])
            for i, seed in enumerate(req.params.sample_seeds()):
                rows.append(_Row(group, i, seed, cohort.device))
        next_ids, done = self._sample_and_advance(cohort, rows, logits)
        cohort.merge(kv, mask, rows, next_ids)
        if any(done):  # finished on their first token (EOS, stop, or max_new_tokens=1)
            offset = len(cohort.rows) - len(rows)
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

    def _decode(self, cohort: Cohort) -> None:
        self._drop_abandoned(cohort)
        if not cohort.rows:
            return
        n = len(cohort.rows)
        positions = cohort.mask.sum(-1, keepdim=True)  # real tokens before the fed one
        mask = torch.cat([cohort.mask, torch.ones((n, 1), dtype=cohort.mask.dtype, device=cohort.device)], dim=1)
        out = cohort.model(
            input_ids=cohort.last[:, None],
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cohort.cache,
            use_cache=True,
        )
        cohort.mask = mask
        cohort.cache = out.past_key_values
        self.steps += 1
        held = sum(c.mask.numel() for c in self._cohorts if c.mask is not None)
        self.peak_cache_tokens = max(self.peak_cache_tokens, held)
        BATCH_SIZE.labels(self.service).observe(n)
        GENERATED_TOKENS.labels(cohort.version).inc(n)
        next_ids, done = self._sample_and_advance(cohort, cohort.rows, out.logits[:, -1].float())
        cohort.last = next_ids
        if any(done):
            cohort.keep([i for i, d in enumerate(done) if not d])

    def _drop_abandoned(self, cohort: Cohort) -> None:
        """Free the rows of cancelled or expired requests before spending a step on them."""
        now = time.monotonic()
        keep = []
        for i, row in enumerate(cohort.rows):
            req = row.req
            if req.cancelled:
                req.fail(grpc.StatusCode.CANCELLED, "cancelled by the client")
            elif req.expired(now):
                req.fail(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while generating")
            elif not req.closed:
                keep.append(i)
        cohort.keep(keep)

    # --- sampling -----------------------------------------------------------
    def _sample_and_advance(
        self, cohort: Cohort, rows: list[_Row], logits: torch.Tensor
    ) -> tuple[torch.Tensor, list[bool]]:
        next_ids, logprobs = sample(logits, rows)
        done = [
            self._advance(cohort, row, int(next_ids[i]), logprobs[i] if logprobs is not None else None)
            for i, row in enumerate(rows)
        ]
        return next_ids, done

    def _advance(self, cohort: Cohort, row: _Row, token: int, logprobs: torch.Tensor | None) -> bool:
        """Append one token to a row: update its text, check stop conditions, emit."""
        req, params = row.req, row.req.params
        row.ids.append(token)
        lp = float(logprobs[token]) if (logprobs is not None and params.return_logprobs) else None
        finish = None
        special = token in cohort.special_ids
        if token == cohort.eos_id:
            finish, piece = FINISH_EOS, ""
            shown = cohort.tokenizer.convert_ids_to_tokens(token)
        else:
            full = cohort.tokenizer.decode(row.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            # Hold back an incomplete UTF-8 character until its last byte arrives.
            piece = "" if full.endswith("\ufffd") else full[len(row.text) :]
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


def _find_stop(text: str, stops: tuple[str, ...], old_len: int) -> int | None:
    """End index of the earliest stop sequence that the newest text completed."""
    best = None
    for stop in stops:
        at = text.find(stop, max(0, old_len - len(stop) + 1))
        if at >= 0 and (best is None or at + len(stop) < best):
            best = at + len(stop)
    return best


def sample(logits: torch.Tensor, rows: list[_Row]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pick each row's next token with that row's own parameters and generator.

    Returns the tokens and, if any row asked for them, the log-probabilities
    under the model's unmodified distribution (what RLHF needs), before
    temperature, top-k, top-p and repetition penalty.
    """
    n, device = logits.shape[0], logits.device
    logprobs = torch.log_softmax(logits, dim=-1) if any(r.req.params.return_logprobs for r in rows) else None
    for i, row in enumerate(rows):
        penalty = row.req.params.repetition_penalty
        if penalty != 1.0:
            seen = torch.tensor(row.req.prompt_ids + row.ids, dtype=torch.long, device=device).unique()
            values = logits[i, seen]
            logits[i, seen] = torch.where(values < 0, values * penalty, values / penalty)
    out = torch.empty(n, dtype=torch.long, device=device)
    greedy = [i for i, r in enumerate(rows) if r.req.params.greedy]
    if greedy:
        out[greedy] = logits[greedy].argmax(-1)
    sampled = [i for i, r in enumerate(rows) if not r.req.params.greedy]
    if not sampled:
        return out, logprobs
    x = logits[sampled] / torch.tensor([rows[i].req.params.temperature for i in sampled], device=device)[:, None]
    ks = torch.tensor([rows[i].req.params.top_k for i in sampled], device=device)
    if bool((ks > 0).any()):
        kmax = min(int(ks.max()), x.shape[-1])
        top = x.topk(kmax, dim=-1).values
        kth = top.gather(1, (ks.clamp(1, kmax) - 1)[:, None])
        x = torch.where((ks > 0)[:, None] & (x < kth), float("-inf"), x)
    ps = torch.tensor([rows[i].req.params.top_p for i in sampled], device=device)
    if bool((ps < 1.0).any()):
        ordered, order = x.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        # Drop a token once the mass before it already reaches top_p; the first always stays.
        drop = (probs.cumsum(-1) - probs) >= ps[:, None]
        ordered = ordered.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(1, order, ordered)
    probs = x.softmax(-1)
    for j, i in enumerate(sampled):
        out[i] = torch.multinomial(probs[j], 1, generator=rows[i].generator)[0]
    return out, logprobs
