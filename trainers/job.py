"""The trainer job lifecycle, shared by every trainer so each trainer file is one flat loop.

A trainer job (SFT, RM, PPO, evaluate) is:

    job = Job.start("sft", SFTConfig, PRESETS, argv, add_args)   # CLI, config, settings, torchrun
    state = job.load_state()                                    # resume after a crash
    for step in range(start, total):
        ... train ...
        job.log(step, metrics); job.save_state(step, ...)        # JSONL + atomic resume point
    job.publish("sft", write_fn, parents=..., metrics=...)      # CheckpointStore.stage + CREATED
    job.finish(metrics)                                         # plots, report, result JSON

Config and CLI: trainers/config.py. Model helpers (autocast, LoRA, EMA,
collectives): trainers/nn.py. Curves and report: trainers/report.py.

Run directory (`--run-dir`, rank 0 writes it):
    run.json            the checkpoint version this run will publish (fixed at
                        first start, so a resumed run never publishes twice)
    config.json         the resolved config
    metrics.jsonl       one JSON object per logged step
    state/latest.pt     the resume point: step, trainable weights, optimizer
    curves.png          training curves;   report.md  a short report

Resuming is exact: the data order is a function of (seed, epoch) and every
step reseeds torch from (seed, rank, step), so a run killed and resumed from
its last state matches the uninterrupted run.

Distributed: under `torchrun`, each rank trains on its slice of each global
batch with DDP (gloo on CPU, nccl on GPU). Only rank 0 writes files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from services.common import bus
from services.common.bootstrap import seed_version
from services.common.checkpoints import CheckpointError, CheckpointStore, new_version
from services.common.config import Settings, exit_on_config_error, load_settings
from services.common.datasets import SnapshotError, SnapshotStore
from services.common.files import write_text_atomic
from services.common.logs import configure_logging, get_logger, log_fields
from services.common.models import ensure_preset, resolve_device
from trainers.config import JobError, parse_cli
from trainers.nn import resolve_autocast
from trainers.report import plot_curves

log = get_logger(__name__)

STATE_FILE = "latest.pt"


# --- data order, seeds, schedule: what makes a resume exact ------------------------


def lr_at(step: int, total: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup, then cosine decay to lr * min_ratio."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def step_seed(seed: int, rank: int, step: int) -> None:
    """Reseed torch per (seed, rank, step): sampling is then independent of where a run resumed."""
    torch.manual_seed((seed * 1_000_003 + rank * 7919 + step) % (2**63 - 1))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1009 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batch(
    order_for_epoch: Callable[[int], list[int]], n: int, batch_size: int, step: int, min_size: int = 1
) -> list[int]:
    """Indices of global batch `step` when each epoch is ceil(n / batch_size) batches.

    A short last batch is topped up from the epoch's start to `min_size`
    (the number of processes), so that every DDP rank gets work each step."""
    per_epoch = max(1, math.ceil(n / batch_size))
    epoch, k = divmod(step, per_epoch)
    order = order_for_epoch(epoch)
    batch = order[k * batch_size : (k + 1) * batch_size]
    return batch + (order * min_size)[: max(0, min_size - len(batch))]


def peak_rss_gb() -> float:
    """Peak resident memory of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


# --- the job ------------------------------------------------------------------------


class Job:
    """One trainer run: CLI + config + settings + run dir + publishing."""

    def __init__(self, name: str, cfg: Any, preset: str, args: argparse.Namespace, settings: Settings):
        self.name = name
        self.cfg = cfg
        self.preset = preset
        self.args = args
        self.settings = settings
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.is_main = self.rank == 0
        self.device = resolve_device(settings.device)
        if self.device == "cuda":
            self.device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(self.device)
        self.bf16 = resolve_autocast(getattr(cfg, "dtype", "float32"), self.device)  # autocast on/off
        self.run_dir = Path(args.run_dir) if getattr(args, "run_dir", None) else None
        self.store = CheckpointStore(settings.checkpoint_dir)
        self.snapshots = SnapshotStore(settings.dataset_dir)
        self.started = time.time()
        self.records: list[dict] = []

    # construction ---------------------------------------------------------
    @classmethod
    def start(
        cls,
        name: str,
        config_cls: type,
        presets: Mapping[str, Mapping[str, Any]],
        argv: list[str] | None,
        add_args: Callable[[argparse.ArgumentParser], None],
        run_dir: bool = True,
    ) -> Job:
        """Parse the CLI and config (trainers/config.py), load settings, join torchrun's process group.
        `run_dir`: whether --run-dir is required (evaluate takes it optionally)."""
        args, cfg = parse_cli(name, config_cls, presets, argv, add_args, run_dir)
        settings = exit_on_config_error(load_settings)
        configure_logging(f"trainer-{name}", settings.log_level)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        job = cls(name, cfg, args.preset, args, settings)
        job._init_distributed()
        if job.is_main and job.run_dir is not None:
            job.run_dir.mkdir(parents=True, exist_ok=True)
            (job.run_dir / "state").mkdir(exist_ok=True)
            (job.run_dir / "config.json").write_text(
                json.dumps({"preset": args.preset, **dataclasses.asdict(cfg)}, indent=2)
            )
        log_fields(
            log,
            logging.INFO,
            f"{name} job starting",
            preset=args.preset,
            rank=job.rank,
            world=job.world,
            device=job.device,
            run_dir=str(job.run_dir) if job.run_dir else None,
        )
        return job

    def _init_distributed(self) -> None:
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.startswith("cuda") else "gloo")

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def wrap_ddp(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world == 1:
            return model
        ids = [self.local_rank] if self.device.startswith("cuda") else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def rank_slice(self, items: list) -> list:
        """This rank's share of a global batch."""
        return items[self.rank :: self.world]

    # inputs ---------------------------------------------------------------
    def checkpoint(self, version: str, kinds: Iterable[str], what: str) -> Path:
        """Verify a checkpoint of one of `kinds` and return its folder."""
        kinds = tuple(kinds)
        try:
            manifest = self.store.verify(version)
        except CheckpointError as err:
            raise JobError(f"{what} {version!r}: {err}") from None
        if manifest.kind not in kinds:
            raise JobError(f"{what} {version!r} is a {manifest.kind} checkpoint; expected {' or '.join(kinds)}")
        return self.store.path(version)

    def base_model(self) -> tuple[Path, list[str]]:
        """The model preset (RLHF_MODEL) and, if the store holds it, its seed version as parent."""
        path = ensure_preset(self.settings.model, self.settings.model_cache)
        seed = seed_version(self.settings, "policy")
        return path, ([seed] if self.store.exists(seed) else [])

    def read(self, snapshot: str, split: str, kind: str) -> list[dict]:
        try:
            return self.snapshots.read(snapshot, split, kind)
        except SnapshotError as err:
            raise JobError(f"--snapshot: {err}") from None

    # run identity, metrics, resume state -----------------------------------
    def planned_version(self, kind: str) -> str:
        """The version this run publishes, fixed at first start and kept across resumes."""
        path = self.run_dir / "run.json"
        version = ""
        if self.is_main:
            version = json.loads(path.read_text())["version"] if path.exists() else new_version(kind)
            write_text_atomic(path, json.dumps({"version": version, "kind": kind}))
        if self.world > 1:  # every rank uses the name rank 0 chose
            box = [version]
            dist.broadcast_object_list(box, src=0)
            version = box[0]
        return version

    def log(self, step: int, metrics: Mapping[str, Any], progress=None) -> None:
        record = {
            "step": step,
            "time_s": round(time.time() - self.started, 3),
            **{k: _plain(v) for k, v in metrics.items()},
        }
        self.records.append(record)
        if self.is_main and self.run_dir is not None:
            with open(self.run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if progress is not None:
            progress.set_postfix(
                {k: f"{v:.3g}" for k, v in record.items() if isinstance(v, float) and k != "time_s"}, refresh=False
            )

    def metrics_history(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def save_state(self, step: int, **state: Any) -> None:
        """Atomically write the resume point (rank 0); `step` = steps completed."""
        if self.is_main:
            tmp = self.run_dir / "state" / f".{STATE_FILE}.tmp"
            torch.save({"step": step, **state}, tmp)
            os.replace(tmp, self.run_dir / "state" / STATE_FILE)
        self.barrier()

    def load_state(self) -> dict | None:
        path = self.run_dir / "state" / STATE_FILE
        if not path.exists():
            return None
        state = torch.load(path, map_location=self.device, weights_only=False)
        # Metrics logged after the resume point are replayed by the resumed run; drop them.
        if self.is_main:
            kept = [r for r in self.metrics_history() if r["step"] < state["step"]]
            write_text_atomic(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
            self.records = kept
        log_fields(log, logging.INFO, "resuming from run dir", step=state["step"], run_dir=str(self.run_dir))
        return state

    # output ---------------------------------------------------------------
    def publish(
        self,
        kind: str,
        version: str,
        write: Callable[[Path], None],
        *,
        parents: list[str],
        snapshot: str,
        metrics: Mapping[str, Any],
    ) -> bool:
        """Stage, hash and atomically publish (rank 0), then announce TYPE_CREATED.

        Returns whether the announcement reached the broker; an unreachable
        broker is not a failure (the controller reads the result file).
        """
        if not self.is_main:
            return False
        if not self.store.exists(version):
            hyper = {"preset": self.preset, "trainer": self.name, **dataclasses.asdict(self.cfg)}
            with self.store.stage(
                kind,
                version=version,
                parents=[p for p in parents if p],
                dataset_snapshot=snapshot,
                hyperparameters=hyper,
            ) as (folder, manifest):
                write(folder)
                manifest.metrics = {k: _plain(v) for k, v in metrics.items()}
            self.store.verify(version)
            log_fields(log, logging.INFO, "checkpoint published", version=version, kind=kind)
        try:
            event = bus.checkpoint_event(
                self.settings, version, bus.events_pb2.CheckpointEvent.TYPE_CREATED, reason=f"{self.name} run"
            )
            bus.announce_checkpoint(self.settings, event)
            return True
        except Exception as err:  # noqa: BLE001 - any broker failure: the checkpoint stands
            log_fields(
                log,
                logging.WARNING,
                "could not announce the checkpoint; it is published in the store",
                version=version,
                error=str(err),
            )
            return False

    def finish(self, result: Mapping[str, Any], curves: Iterable[str] = (), report: str = "") -> None:
        """Write the result JSON, curves.png and report.md (rank 0); then leave the process group."""
        if self.is_main:
            if self.run_dir is not None:
                records = self.metrics_history() or self.records
                if curves and records:
                    plot_curves(
                        self.run_dir / "curves.png", records, list(curves), title=f"{self.name} ({self.preset})"
                    )
                if report:
                    (self.run_dir / "report.md").write_text(report)
            payload = {**result, "run_dir": str(self.run_dir) if self.run_dir else ""}
            write_text_atomic(Path(self.args.result_file), json.dumps(payload, indent=2, default=_plain))
            log_fields(
                log,
                logging.INFO,
                f"{self.name} job finished",
                result_file=self.args.result_file,
                wall_s=round(time.time() - self.started, 1),
            )
        self.barrier()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_main(main: Callable[[list[str] | None], int]) -> None:
    """Entry point wrapper: bad input exits 2 with one clear line, nothing published."""
    try:
        code = main(sys.argv[1:])
    except JobError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    raise SystemExit(code)


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
