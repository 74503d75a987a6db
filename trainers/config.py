"""Trainer configs: the fields every algorithm shares, and how a config is resolved.

One @dataclass per algorithm (SFTConfig in sft.py, RMConfig in rm.py,
PPOConfig in ppo.py, EvalConfig in evaluate.py), each with its presets beside
it. The fields they share are written once here and inherited, as TRL's
configs share theirs:

    TrainConfig            model (LoRA, dtype) + optimiser (lr, max_grad_norm) + job (save_every, seed)
    └── SupervisedConfig   + epochs, batches, schedule, max_tokens, eval_every   (SFT, RM)

An algorithm's class repeats a shared field only to change its default, so
each algorithm's own block shows every value that differs.

Values come from the preset, then an optional `--config` JSON file (or
inline JSON), then `--set key=value` overrides; an unknown key or a value of
the wrong type stops the job with a message that names the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class JobError(Exception):
    """Bad input or an unusable dependency; the message names what and why."""


def require(condition: bool, message: str) -> None:
    """Config validation helper: raise JobError(message) unless condition holds."""
    if not condition:
        raise JobError(message)


# --- the shared fields ---------------------------------------------------------

TRAIN_DTYPES = ("auto", "float32", "bfloat16")  # see services/common/dtypes.py


@dataclass
class TrainConfig:
    """Fields every training algorithm has.

    Model:     lora_rank (0 = full fine-tuning), lora_alpha, lora_dropout,
               lora_targets (comma-separated module names), lora_top_layers (> 0:
               adapters only in the last N blocks, so backward stops there; 0 = all);
               dtype (auto: bf16 autocast only where bf16 is native, else fp32).
    Optimiser: lr, max_grad_norm.
    Job:       save_every (steps between resume points), seed.
    """

    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    lora_top_layers: int = 0
    dtype: str = "auto"
    lr: float = 1e-5
    max_grad_norm: float = 1.0
    save_every: int = 10
    seed: int = 0

    def validate(self) -> None:
        require(self.lr > 0, f"lr={self.lr} must be positive")
        require(self.lora_top_layers >= 0, f"lora_top_layers={self.lora_top_layers} must be 0 (all) or more")
        require(self.save_every >= 1, f"save_every={self.save_every} must be at least 1")


@dataclass
class SupervisedConfig(TrainConfig):
    """Fields of the supervised trainers (SFT, RM), which step through a dataset.

    Training: epochs, max_steps (> 0 caps the run), batch_size (examples per
              step, global), micro_batch_size (per forward, per rank),
              min_lr_ratio (cosine decay to lr * min_lr_ratio), warmup_steps,
              weight_decay.
    Data:     max_tokens per sequence (the prompt is cut from the left).
    Job:      eval_every (steps; 0 = once per epoch for SFT, at the end for RM).
    """

    epochs: int = 1
    max_steps: int = 0
    batch_size: int = 8
    micro_batch_size: int = 4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_tokens: int = 256
    eval_every: int = 0

    def validate(self) -> None:
        require(self.epochs >= 1, f"epochs={self.epochs} must be at least 1")
        require(
            self.batch_size >= 1 and self.micro_batch_size >= 1, "batch_size and micro_batch_size must be at least 1"
        )
        require(self.max_tokens >= 8, f"max_tokens={self.max_tokens} is below the minimum 8")
        super().validate()


# --- resolution: preset < --config < --set ----------------------------------------


def _coerce(cls: type, key: str, value: Any) -> Any:
    """Turn a JSON / --set value into the type of config field `key`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        known = ", ".join(sorted(fields))
        raise JobError(f"unknown config key {key!r} for {cls.__name__}; known keys: {known}")
    default = getattr(cls(), key)
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise JobError(f"config key {key!r} must be a boolean (true/false), got {value!r}")
    if kind is int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | str)
            or (isinstance(value, str) and not value.lstrip("-").isdigit())
        ):
            raise JobError(f"config key {key!r} must be an integer, got {value!r}")
        return int(value)
    if kind is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise JobError(f"config key {key!r} must be a number, got {value!r}") from None
    if not isinstance(value, str):
        raise JobError(f"config key {key!r} must be a string, got {value!r}")
    return value


def build_config(
    cls: type,
    presets: Mapping[str, Mapping[str, Any]],
    preset: str,
    config: str | None = None,
    sets: Iterable[str] = (),
) -> Any:
    """Preset, then the --config JSON (a file path or inline JSON), then --set key=value."""
    if preset not in presets:
        raise JobError(f"unknown preset {preset!r}; expected one of {', '.join(presets)}")
    values: dict[str, Any] = {}
    layers: list[Mapping[str, Any]] = [presets[preset]]
    if config:
        text = config if config.lstrip().startswith("{") else _read_text(config, "--config")
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as err:
            raise JobError(f"--config is not valid JSON: {err}") from None
        if not isinstance(loaded, dict):
            raise JobError("--config must hold a JSON object of config keys")
        layers.append(loaded)
    overrides = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise JobError(f"--set {item!r}: expected key=value")
        try:  # the controller passes JSON-encoded values; bare strings are fine too
            overrides[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key.strip()] = raw
    layers.append(overrides)
    for layer in layers:
        for key, value in layer.items():
            values[key] = _coerce(cls, key, value)
    cfg = cls(**values)
    if getattr(cfg, "dtype", "auto") not in TRAIN_DTYPES:
        raise JobError(f"config key 'dtype' must be one of {', '.join(TRAIN_DTYPES)}; got {cfg.dtype!r}")
    check = getattr(cfg, "validate", None)
    if check:
        check()
    return cfg


def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as err:
        raise JobError(f"{what} {path}: {err.strerror}") from None


# --- the command line ------------------------------------------------------------


def parse_cli(
    name: str,
    config_cls: type,
    presets: Mapping[str, Mapping[str, Any]],
    argv: list[str] | None,
    add_args: Callable[[argparse.ArgumentParser], None],
    run_dir: bool = True,
) -> tuple[argparse.Namespace, Any]:
    """A trainer's arguments (its own from `add_args`, then the common ones) and its resolved config.

    A bad config key or value exits 2 with argparse's usage line and the message.
    `run_dir`: whether --run-dir is required (evaluate takes it optionally).
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m trainers.{name}", description=(config_cls.__doc__ or "").split("\n\n")[0]
    )
    add_args(parser)
    parser.add_argument("--run-dir", required=run_dir, help="working folder; re-running with it resumes")
    parser.add_argument("--result-file", required=True, help="where the result JSON is written")
    parser.add_argument("--preset", default="cpu", help=f"one of {', '.join(presets)} (default cpu)")
    parser.add_argument("--config", help="JSON file (or inline JSON object) of config keys")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    args = parser.parse_args(argv)
    try:
        return args, build_config(config_cls, presets, args.preset, args.config, args.set)
    except JobError as err:
        parser.error(str(err))
