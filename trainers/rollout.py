"""PPO rollouts: sample one response per prompt from the current policy.

Two generators produce the same `Rollouts` batch:

- `EngineRollouts` (the default, `rollout_engine = "engine"`): the policy
  service's continuous-batching engine (services/policy/engine.py), run in
  the trainer process on the live policy module, the way OpenRLHF and veRL
  hand rollouts to an inference engine. A finished row leaves the batch at
  once instead of decoding padding until the longest row ends, identical
  prompts that join together are prefilled once, and each sample has its own
  seeded generator, so a rollout depends only on (seed, rank, step, index), not on
  the batch it shared. With full fine-tuning the engine decodes with the
  live policy module itself: optimizer steps update the weights it uses, no
  copy, no reload. With LoRA it decodes with a plain copy whose adapted
  weights are refreshed to W + s·BA from the live adapters before every
  rollout batch (one matmul and copy per layer): measured on the 135M model,
  8 rows x 32 tokens, 2 cores, merged weights decoded about 15% faster than
  the adapter path. Where training runs bf16 autocast on a CPU (`auto` picks
  it only where bf16 is native), the engine decodes from a bf16 copy, LoRA or
  not, refreshed the same way, so that the fused step runs its bf16 matmuls
  (AMX tiles where the CPU has them): measured on the 135M model with LoRA,
  8 rows x 32 tokens, 2 cores, AMX, a rollout batch took 1.3-1.6 s against
  3.2-3.7 s from the fp32 copy. On a GPU it runs under the job's autocast.
- `generate_rollouts` (`rollout_engine = "hf"`): transformers' `generate`
  in static batches of `generation_batch_size`; kept for comparison and for
  trainers/evaluate.py.

The engine runs in the trainer's own thread, through services/policy/offline.py
(shared with the gate job and the demo's evaluation): no second thread runs
torch, so the process keeps one OpenMP pool (services/common/openmp.py).

The log-probabilities PPO uses are recomputed by the trainer's own forward
pass (trainers/ppo.py `rollout_stats`), as OpenRLHF and veRL do; the
engine's sampled-token log-probs are returned too, and a test checks that
they agree with that forward pass (a mismatch would bias the PPO ratio).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.common.config import Settings
from services.common.logs import get_logger
from services.common.models import pad_batch
from services.policy.offline import GenerationError, OfflineEngine
from services.policy.params import FINISH_EOS
from trainers.config import JobError
from trainers.nn import autocast, unwrap

log = get_logger(__name__)

ROLLOUT_ENGINES = ("engine", "hf")
SEED_BITS = 62


@dataclass
class Rollouts:
    """Prompts (left-padded) followed by responses (right-padded after EOS)."""

    ids: torch.Tensor  # [B, P + R]
    mask: torch.Tensor  # [B, P + R]
    prompt_width: int  # P
    response_mask: torch.Tensor  # [B, R]: 1 on real response tokens, EOS included
    has_eos: torch.Tensor  # [B] bool
    # The generator's log π(y_t) of each sampled token ([B, R], 0 on padding); the engine's only.
    sampler_logprobs: torch.Tensor | None = None


def assemble(
    prompt_ids: list[list[int]],
    responses: torch.Tensor,
    pad: int,
    eos: int,
    device: str,
    sampler_logprobs: torch.Tensor | None = None,
) -> Rollouts:
    """Left-padded prompts + responses [B, R]; everything after a row's first EOS
    becomes padding, and columns that are padding in every row are dropped, so
    scoring and updates never compute on them."""
    ids, mask = pad_batch(prompt_ids, pad, side="left")
    is_eos = responses == eos
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    response_mask = (~after_eos).long()
    width = max(1, int(response_mask.sum(1).max()))
    responses = responses.masked_fill(after_eos, pad)[:, :width]
    response_mask, is_eos = response_mask[:, :width], is_eos[:, :width]
    if sampler_logprobs is not None:
        sampler_logprobs = (sampler_logprobs[:, :width] * response_mask).to(device)
    return Rollouts(
        ids=torch.cat([ids, responses], 1).to(device),
        mask=torch.cat([mask, response_mask], 1).to(device),
        prompt_width=ids.shape[1],
        response_mask=response_mask.to(device),
        has_eos=is_eos.any(1).to(device),
        sampler_logprobs=sampler_logprobs,
    )


@torch.no_grad()
def generate_rollouts(
    policy,
    tokenizer,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    device: str,
    bf16: bool = False,
) -> Rollouts:
    """transformers' `generate` in static batches. All chunks share the prompt
    width and are right-padded to max_new_tokens, so they concatenate (`assemble`
    then drops the all-padding columns)."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    width = max(len(p) for p in prompt_ids)
    ids, mask = pad_batch(prompt_ids, pad, side="left")
    responses = []
    for i in range(0, len(prompt_ids), batch_size):
        with autocast(device, bf16):
            out = unwrap(policy).generate(
                input_ids=ids[i : i + batch_size].to(device),
                attention_mask=mask[i : i + batch_size].to(device),
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        response = out[:, width:].cpu()
        responses.append(F.pad(response, (0, max_new_tokens - response.shape[1]), value=pad))
    return assemble(prompt_ids, torch.cat(responses), pad, eos, device)


class _Autocast(torch.nn.Module):
    """The policy, called under bf16 autocast on whichever thread calls it
    (autocast state is per thread, and the engine decodes on its own)."""

    def __init__(self, model: torch.nn.Module, device: str):
        super().__init__()
        self.inner = model
        self.device_type = "cuda" if device.startswith("cuda") else "cpu"

    def forward(self, *args, **kwargs):
        with torch.autocast(device_type=self.device_type, dtype=torch.bfloat16):
            return self.inner(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, `inner`
        except AttributeError:
            return getattr(self.inner, name)  # get_output_embeddings, config, ...


def is_lora(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


class DecodeCopy:
    """A plain, frozen copy of the policy, in `dtype`, that rollouts decode with.

    For a LoRA-wrapped policy the adapters are folded in: `sync()` sets each
    adapted weight of the copy to W + ΔW (peft's `get_delta_weight`) from the
    live model's frozen W and current adapters. For a fully fine-tuned policy
    `sync()` copies every parameter. The live model is never modified, so
    training stays bit-exact whatever generation does (merging in place and
    back would drift W)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        self.lora = is_lora(model)
        plain = copy.deepcopy(model).merge_and_unload() if self.lora else copy.deepcopy(model)
        self.model = plain.to(dtype).eval().requires_grad_(False)
        if self.lora:
            from peft.tuners.lora import LoraLayer

            base = model.get_base_model()
            self.pairs = [
                (layer, self.model.get_submodule(name))
                for name, layer in base.named_modules()
                if isinstance(layer, LoraLayer)
            ]
        else:
            own = dict(self.model.named_parameters())
            self.pairs = [(param, own[name]) for name, param in model.named_parameters()]

    @torch.no_grad()
    def sync(self) -> None:
        if not self.lora:
            for param, target in self.pairs:
                target.copy_(param)
            return
        for layer, target in self.pairs:
            weight = layer.get_base_layer().weight.detach().clone()
            for adapter in layer.active_adapters:
                weight += layer.get_delta_weight(adapter).to(weight.dtype)
            target.weight.copy_(weight)


class EngineRollouts:
    """The continuous-batching engine on the live policy, sized for one rollout batch
    (services/policy/offline.py). Call `close()` when training ends."""

    def __init__(
        self,
        policy: torch.nn.Module,
        tokenizer,
        settings: Settings,
        *,
        rows: int,
        max_prompt_tokens: int,
        max_new_tokens: int,
        device: str,
        bf16: bool = False,
        version: str = "ppo-rollout",
    ):
        self.tokenizer = tokenizer
        self.device = device
        self.max_new_tokens = max_new_tokens
        model = unwrap(policy)
        cuda = device.startswith("cuda")
        # bf16 training on a CPU (native bf16 only, under `auto`) decodes from a bf16 copy, which
        # the fused step runs on bf16 matmuls; fp32 decodes from a merged copy for LoRA, else the live
        # module; a GPU decodes the live module (or the merged copy) under the job's autocast.
        if bf16 and not cuda:
            self.mirror: DecodeCopy | None = DecodeCopy(model, torch.bfloat16)
        else:
            self.mirror = DecodeCopy(model, next(model.parameters()).dtype) if is_lora(model) else None
        decoder = self.mirror.model if self.mirror else model
        under_autocast = bf16 and cuda
        self.offline = OfflineEngine(
            _Autocast(decoder, device) if under_autocast else decoder,
            tokenizer,
            settings,
            rows=rows,
            max_prompt_tokens=max_prompt_tokens,
            max_new_tokens=max_new_tokens,
            service="ppo-rollout",
            version=version,
            fused=not under_autocast,
        )

    @property
    def fused_reason(self) -> str | None:
        return self.offline.fused_reason

    @property
    def fused_batches(self) -> int:
        return self.offline.fused_batches

    def close(self) -> None:
        self.offline.close()

    def generate(self, prompt_ids: list[list[int]], temperature: float, seeds: list[int]) -> Rollouts:
        """One sampled response per prompt; sample i uses seeds[i] (services/policy/offline.py)."""
        if self.mirror:
            self.mirror.sync()
        try:
            samples = self.offline.generate(prompt_ids, seeds, temperature=temperature, return_logprobs=True)
        except GenerationError as err:
            raise JobError(f"rollout generation failed: {err}") from err
        pad = self.tokenizer.pad_token_id
        responses = torch.full((len(prompt_ids), self.max_new_tokens), pad, dtype=torch.long)
        logprobs = torch.zeros((len(prompt_ids), self.max_new_tokens), dtype=torch.float32)
        for row, sample in enumerate(samples):
            tokens = sample.tokens
            responses[row, : len(tokens)] = torch.tensor([t.id for t in tokens], dtype=torch.long)
            logprobs[row, : len(tokens)] = torch.tensor([t.logprob for t in tokens], dtype=torch.float32)
            if sample.finish_reason == FINISH_EOS and tokens[-1].id != self.tokenizer.eos_token_id:
                raise JobError("the rollout engine reported EOS without an EOS token")
        return assemble(prompt_ids, responses, pad, self.tokenizer.eos_token_id, self.device, logprobs)


def rollout_seeds(n: int) -> list[int]:
    """Per-sample seeds drawn from torch's global generator (reseeded per
    (seed, rank, step) by the trainer), so generation is reproducible."""
    return torch.randint(0, 2**SEED_BITS, (n,)).tolist()
