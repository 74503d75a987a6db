"""The serving engine run in the caller's own thread over a fixed list of prompts.

`OfflineEngine` (and `sample_all`, one pass over a list with a model that does
not change meanwhile) is what the PPO rollouts (trainers/rollout.py), the gate job
(services/controller/gate_eval.py) and the demo's evaluation
(services/sim/report.py) sample with: the continuous-batching engine
(services/policy/engine.py) on a model already in memory, sized so that one
batch of `rows` prompts runs as a single continuous batch, with the fused
decode step (services/policy/fused.py) where the model supports it.

- Each prompt's sample has its own seeded generator, so a response depends
  only on (prompt, seed), never on which prompts shared its batch or on the
  batch size.
- A run of identical prompts whose seeds count up by one goes in one request
  of that many samples (the engine samples j of a request with its seed + j,
  so every row still uses its own seed), prefilled once. The engine also
  prefills identical prompts that join together once.
- A finished row leaves the batch at once instead of decoding padding until
  the longest row ends.

Only the engine's public interface is used: `Engine(settings, own_thread=False)`,
`set_model(Loaded)`, `submit(GenRequest)`, `run_until_idle()` in the caller's
thread, events back through each request's queue, `stop()`. The engine has no
scheduler thread here: a second thread running torch would start a second
OpenMP pool, and libgomp then cuts every pool's spinning short
(services/common/openmp.py).

The fused step holds copies of the weights taken when it is built, so it is
rebuilt at every `generate` call: a model trained between calls (PPO) is
always decoded with its current weights.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from tqdm import tqdm

from services.common.checkpoints import Manifest
from services.common.config import Settings
from services.common.hotswap import Loaded
from services.common.logs import get_logger, log_fields
from services.policy.engine import Engine
from services.policy.fused import FusedDecoder, ops_for, unsupported
from services.policy.params import GenParams, SampleOut
from services.policy.request import EventQueue, Failed, Finished, GenRequest, SampleDone

log = get_logger(__name__)


class GenerationError(RuntimeError):
    """The engine failed a request of the batch; the message is the engine's."""


class OfflineEngine:
    """The continuous-batching engine on `model`, for batches of up to `rows` prompts.

    The KV budget admits `rows` sequences at the longest prompt plus
    `max_new_tokens`. `fused=False` (or a model the fused step cannot run, or
    RLHF_FUSED_DECODE=false) decodes through the model's own forward. Call
    `close()` when done."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        settings: Settings,
        *,
        rows: int,
        max_prompt_tokens: int,
        max_new_tokens: int,
        service: str,
        version: str = "offline",
        fused: bool = True,
    ):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        horizon = max_prompt_tokens + max_new_tokens
        engine_settings = dataclasses.replace(
            settings,
            max_batch=max(1, min(rows, 1024)),
            max_queue=max(64, rows),
            max_prompt_tokens=max_prompt_tokens,
            max_new_tokens_limit=max_new_tokens,
            default_max_new_tokens=max_new_tokens,
            kv_budget_tokens=max(64, rows * horizon),
        )
        self.rows, self.fused_batches = engine_settings.max_batch, 0
        self.engine = Engine(engine_settings, service=service, own_thread=False)
        self.engine.set_model(Loaded(version, Manifest(version, "offline", "policy"), None, model, tokenizer))
        if not fused:
            self.fused_reason: str | None = "the model decodes under autocast"
        elif not settings.fused_decode:
            self.fused_reason = "RLHF_FUSED_DECODE=false"
        else:
            self.fused_reason = unsupported(model, now=False)
        if self.fused_reason is None:
            self.ops, ops_reason = ops_for(model, settings)
            name = self.ops.name
            log_fields(log, logging.INFO, f"{service} decode step", fused=True, kernels=name, reason=ops_reason)
        else:
            log_fields(log, logging.INFO, f"{service} decode step", fused=False, reason=self.fused_reason)

    def close(self) -> None:
        self.engine.stop()

    def generate(
        self,
        prompt_ids: list[list[int]],
        seeds: list[int],
        *,
        temperature: float,
        top_p: float = 1.0,
        return_logprobs: bool = False,
    ) -> list[SampleOut]:
        """One sample per prompt, in the prompts' order; sample i uses seeds[i]
        (temperature 0: greedy). Raises GenerationError if the engine fails one."""
        if len(seeds) != len(prompt_ids):
            raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
        if self.fused_reason is None:  # the caller has the model in eval mode
            self.model.rlhf_fused = FusedDecoder(self.model, rows=self.rows, ops=self.ops)
            self.fused_batches += 1
        groups: list[list[int]] = []  # runs of one prompt whose seeds count up by one: one request each
        for i, p in enumerate(prompt_ids):
            if groups and p == prompt_ids[i - 1] and seeds[i] == seeds[i - 1] + 1:
                groups[-1].append(i)
            else:
                groups.append([i])
        pending = []
        try:
            for members in groups:
                params = GenParams(
                    max_new_tokens=self.max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=0,
                    seed=seeds[members[0]],
                    num_samples=len(members),
                    return_logprobs=return_logprobs,
                )
                events = EventQueue()
                req = GenRequest(list(prompt_ids[members[0]]), params, events)
                self.engine.submit(req)
                pending.append((req, events, members))
            self.engine.run_until_idle()
        finally:
            self.model.__dict__.pop("rlhf_fused", None)  # its weight copies go stale once the model trains
        out: list[SampleOut | None] = [None] * len(prompt_ids)
        for req, events, members in pending:
            for sample, row in zip(self._collect(req, events), members, strict=True):
                out[row] = sample
        return out  # type: ignore[return-value]

    @staticmethod
    def _collect(req: GenRequest, events: EventQueue) -> list[SampleOut]:
        samples: dict[int, SampleOut] = {}
        for event in events.events(req):
            if isinstance(event, SampleDone):
                samples[event.sample.index] = event.sample
            elif isinstance(event, Failed):
                raise GenerationError(event.error.message)
            elif isinstance(event, Finished):
                break
        return [samples[i] for i in sorted(samples)]


def sample_all(
    model: torch.nn.Module,
    tokenizer,
    settings: Settings,
    prompt_ids: list[list[int]],
    seeds: list[int],
    *,
    rows: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    return_logprobs: bool = False,
    service: str,
    version: str = "offline",
    desc: str | None = None,
) -> list[SampleOut]:
    """One sample per prompt from a model that does not change meanwhile: an engine
    sized for `rows` at a time (a response does not depend on it), closed at the end;
    `desc` shows a progress bar over the batches."""
    if len(seeds) != len(prompt_ids):
        raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
    if not prompt_ids:
        return []
    rows = max(1, min(rows, len(prompt_ids)))
    engine = OfflineEngine(
        model,
        tokenizer,
        settings,
        rows=rows,
        max_prompt_tokens=max(map(len, prompt_ids)),
        max_new_tokens=max_new_tokens,
        service=service,
        version=version,
    )
    out: list[SampleOut] = []
    try:
        for b in tqdm(range(0, len(prompt_ids), rows), desc=desc, unit="batch", disable=desc is None):
            out += engine.generate(
                prompt_ids[b : b + rows],
                seeds[b : b + rows],
                temperature=temperature,
                top_p=top_p,
                return_logprobs=return_logprobs,
            )
    finally:
        engine.close()
    return out
