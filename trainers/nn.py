"""Model-side helpers the trainers share: bf16 autocast, LoRA adapters, the
trainable state (what a resume point saves), an EMA of the weights, and the
few collectives a DDP run needs beyond DDP itself."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

import torch
import torch.distributed as dist

from services.common.dtypes import resolve_dtype
from services.common.logs import get_logger, log_fields
from trainers.config import JobError, TrainConfig

log = get_logger(__name__)

# --- precision ---------------------------------------------------------------------


def resolve_autocast(setting: str, device: str) -> bool:
    """Whether to train under bf16 autocast, by services/common/dtypes' one rule:
    `auto` is bf16 on a GPU or a CPU with native bf16 (AVX512-BF16, AMX), else fp32.
    Emulated bf16 ran ~25x slower than fp32 on an AVX2-only CPU. Logs the choice."""
    dtype, reason = resolve_dtype(setting, device)
    log_fields(log, logging.INFO, "training dtype", dtype=str(dtype).removeprefix("torch."), reason=reason)
    return dtype == torch.bfloat16


def autocast(device: str, enabled: bool):
    """bf16 autocast when `enabled` (the Job's resolved `bf16`); a no-op when off."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)


# --- LoRA, trainable state ----------------------------------------------------------


def add_lora(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """Wrap `model` with LoRA adapters (peft) as `cfg` says; only the adapters train.

    cfg.lora_top_layers > 0 puts adapters only in the last that many transformer blocks: nothing
    below them needs a gradient, so the backward pass stops there."""
    from peft import LoraConfig, get_peft_model

    modules = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    layers, top = model.config.num_hidden_layers, cfg.lora_top_layers
    only = list(range(layers - top, layers)) if 0 < top < layers else None
    config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=modules,
        bias="none",
        layers_to_transform=only,
        layers_pattern="layers" if only else None,
    )
    return get_peft_model(model, config)


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold LoRA adapters into the weights so serving loads a plain HF model."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unwrap(model).named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    model = unwrap(model)
    wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = wanted - set(state)
    if missing:
        raise JobError(
            f"resume state lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}); was the config changed?"
        )
    model.load_state_dict(dict(state), strict=False)


class WeightEMA:
    """An exponential moving average of a model's trainable weights:
    ema ← decay·ema + (1 − decay)·w after every optimizer step, starting from
    the weights at construction. InstructGPT publishes the EMA of the PPO
    policy (decay 0.992) rather than its last iterate."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = trainable_state(model)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, param in unwrap(model).named_parameters():
            if param.requires_grad:
                self.shadow[name].mul_(self.decay).add_(param.detach(), alpha=1 - self.decay)

    def copy_to(self, model: torch.nn.Module) -> None:
        load_trainable_state(model, self.shadow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise JobError(
                f"resume state's EMA lacks {len(missing)} tensors (e.g. {sorted(missing)[0]}); was the config changed?"
            )
        self.shadow = {name: state[name].clone() for name in self.shadow}


# --- distributed ----------------------------------------------------------------------


def all_reduce_(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce (sum by default) when distributed; identity otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def sum_over_ranks(values: list[float], device: str) -> list[float]:
    """Each value summed over the ranks (for logging what every rank saw)."""
    return all_reduce_(torch.tensor(values, dtype=torch.float64, device=device)).tolist()
