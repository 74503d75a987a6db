"""`make demo`: one full InstructGPT loop on this machine, through the real
services and the real broker, ending in an evaluation report.

  1. start an isolated local stack (broker, policy, reward, feedback,
     playground) on free ports, with the simulated population's tokens;
  2. simulated users log prompts through FeedbackService;
  3. simulated labelers write demonstrations;
  4. the controller builds a snapshot and trains SFT, which is promoted and
     hot-swapped into the policy service;
  5. labelers rank K samples of the SFT policy (served over gRPC);
  6. the controller trains the RM, then PPO, evaluates the candidate against
     the serving SFT policy, and promotes it if the gate passes;
  7. the new policy is served, and the report is written: RM accuracy vs the
     gold labeler, gold win rates with 95% CIs, KL, curves, examples.

`python -m services.demo --preset cpu|gpu|tiny [--seed N] [--home DIR] [--keep-up]`

Every step is seeded, so a run repeats exactly on one machine. `--seed`
changes all of them at once (population, labelers, trainers, evaluation
sampling): runs with different seeds show how much the results vary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from rlhf.v1 import common_pb2, policy_pb2_grpc

from services.common.auth import bearer
from services.common.broker import free_port
from services.common.config import exit_on_config_error, load_settings


@dataclass(frozen=True)
class DemoPreset:
    """Sizes of one demo run. `cpu` must finish in about 20 minutes on 2 cores."""

    model: str
    trainer_preset: str
    users: int
    prompts: int
    demonstrations: int
    comparisons: int
    k: int
    sample_tokens: int
    eval_prompts: int
    eval_tokens: int
    trainer_overrides: dict = field(default_factory=dict)


PRESETS = {
    "cpu": DemoPreset(
        model="base",
        trainer_preset="cpu",
        users=80,
        prompts=900,
        demonstrations=96,
        comparisons=128,
        k=4,
        sample_tokens=48,
        eval_prompts=64,
        eval_tokens=48,
        trainer_overrides={"ppo": {"total_steps": 24, "lr": 1e-4}},
    ),
    "gpu": DemoPreset(
        model="base",
        trainer_preset="gpu",
        users=120,
        prompts=2400,
        demonstrations=400,
        comparisons=600,
        k=6,
        sample_tokens=64,
        eval_prompts=256,
        eval_tokens=64,
    ),
    # For the e2e test and a quick look: the tiny model learns nothing useful.
    "tiny": DemoPreset(
        model="tiny",
        trainer_preset="tiny",
        users=20,
        prompts=320,
        demonstrations=16,
        comparisons=16,
        k=4,
        sample_tokens=16,
        eval_prompts=16,
        eval_tokens=16,
    ),
}


class Step:
    """Prints numbered steps with their duration, so progress is always visible."""

    def __init__(self, total: int):
        self.total, self.n, self.started, self.timings = total, 0, time.monotonic(), {}

    def __call__(self, title: str):
        self.n += 1
        print(f"\n[{self.n}/{self.total}] {title}  (t+{time.monotonic() - self.started:.0f}s)", flush=True)
        return _Timer(self, title)


class _Timer:
    def __init__(self, step: Step, title: str):
        self.step, self.title = step, title

    def __enter__(self):
        self.t0 = time.monotonic()

    def __exit__(self, *exc):
        self.step.timings[self.title] = round(time.monotonic() - self.t0, 1)


def wait_for_version(target: str, version: str, token: str, timeout: float = 120.0) -> float:
    """Poll the policy service until it serves `version`; return seconds waited."""
    t0 = time.monotonic()
    with grpc.insecure_channel(target) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        while time.monotonic() - t0 < timeout:
            if (
                stub.GetModelInfo(common_pb2.GetModelInfoRequest(), metadata=bearer(token), timeout=10).version
                == version
            ):
                return time.monotonic() - t0
            time.sleep(0.5)
    raise TimeoutError(f"policy service did not serve {version} within {timeout:.0f}s")


def configure_environment(preset: DemoPreset, home: Path, seed: int = 0) -> None:
    """The demo's isolated stack: its own state folder, broker and ports."""
    overrides = {
        trainer: {**preset.trainer_overrides.get(trainer, {}), "seed": seed} for trainer in ("sft", "rm", "ppo")
    }
    os.environ.update(
        {
            "RLHF_HOME": str(home),
            "RLHF_MODEL": preset.model,
            "RLHF_TRAINER_PRESET": preset.trainer_preset,
            "RLHF_TRAINER_OVERRIDES": json.dumps(overrides),
            "RLHF_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
            "RLHF_BROKER_S3_PORT": str(free_port()),
            "RLHF_TOKENS_FILE": str(home / "tokens.json"),
            "RLHF_JOB_RETRIES": os.environ.get("RLHF_JOB_RETRIES", "1"),
        }
    )
    for name in ("POLICY", "REWARD", "FEEDBACK", "HTTP", "PLAYGROUND", "CONTROLLER"):
        os.environ[f"RLHF_{name}_PORT"] = str(free_port())
    for name in ("POLICY", "REWARD", "FEEDBACK"):
        os.environ[f"RLHF_{name}_TARGET"] = f"127.0.0.1:{os.environ[f'RLHF_{name}_PORT']}"


def run(preset_name: str, home: Path, keep_up: bool = False, seed: int = 0) -> Path:
    from services.common.checkpoints import CheckpointStore
    from services.controller.controller import Controller
    from services.controller.local_executor import LocalExecutor
    from services.sim import labelers as sim_labelers
    from services.sim import report as sim_report
    from services.sim import users as sim_users
    from services.stack import Stack

    preset = PRESETS[preset_name]
    if home.exists():
        Stack(exit_on_config_error(lambda: load_settings({**os.environ, "RLHF_HOME": str(home)}))).down()
        shutil.rmtree(home)
    home.mkdir(parents=True)
    population = sim_users.make_population(seed=seed, n_users=preset.users, n_prompts=preset.prompts)
    population.write_tokens(home / "tokens.json")
    configure_environment(preset, home, seed)
    settings = exit_on_config_error(load_settings)
    step = Step(8)
    stack = Stack(settings, skip=("controller",))  # the demo drives the controller itself, in the open
    try:
        with step("start the local stack"):
            stack.up(timeout=300)
        feedback = grpc.insecure_channel(settings.feedback_target)
        policy = grpc.insecure_channel(settings.policy_target)
        watcher = population.labelers[0].token  # GetModelInfo needs a token too

        with step(f"{preset.users} simulated users log {preset.prompts} prompts"):
            sim_users.submit_prompts(feedback, population)
        with step(f"labelers write {preset.demonstrations} demonstrations"):
            queued = sim_labelers.read_prompt_events(settings)
            pool = sim_labelers.LabelerPool(population, feedback, policy, prompts=queued, seed=seed)
            pool.demonstrate(preset.demonstrations)

        controller = Controller(settings, LocalExecutor(settings.home / "controller" / "jobs", echo=True))
        with step("controller: snapshot -> SFT -> promote"):
            first = controller.step(force=True)
            if not first or "sft" not in first.trained:
                raise SystemExit(f"SFT round failed: {first and first.decision}")
            sft = first.trained["sft"]
            swap_s = wait_for_version(settings.policy_target, sft, watcher)
            print(f"  SFT policy {sft} promoted; hot-swap took {swap_s:.1f}s")

        with step(f"labelers rank K={preset.k} SFT samples for {preset.comparisons} prompts"):
            pool.compare(preset.comparisons, k=preset.k, max_new_tokens=preset.sample_tokens)

        with step("controller: snapshot -> RM -> PPO -> gate"):
            second = controller.step(force=True)
            if not second or "ppo" not in second.trained:
                raise SystemExit(f"RM/PPO round failed: {second and second.decision}")
            ppo, promoted = second.trained["ppo"], bool(second.decision.get("promote"))
            print(f"  gate: {second.decision.get('reason')}")
            if promoted:
                print(f"  PPO policy {ppo} serving after {wait_for_version(settings.policy_target, ppo, watcher):.1f}s")

        with step("evaluate against the gold labeler and write the report"):
            store = CheckpointStore(settings.checkpoint_dir)
            base = next((m.version for m in store.list(role="policy") if m.kind == "base"), None)
            report = sim_report.write_report(
                settings,
                home / "report",
                base_version=base,
                sft_version=sft,
                ppo_version=ppo,
                rm_version=second.trained["rm"],
                snapshot_id=second.snapshot,
                run_dirs={
                    **{k: Path(v) for k, v in first.run_dirs.items()},
                    **{k: Path(v) for k, v in second.run_dirs.items()},
                },
                extra={
                    "preset": asdict(preset) | {"name": preset_name, "seed": seed},
                    "gate": second.decision,
                    "gate_evaluations": second.evaluations,
                    "kl_to_sft": second.evaluations.get("candidate", {}).get("kl_to_reference"),
                    "ppo_promoted": promoted,
                    "timings_s": step.timings,
                    "controller_decisions": str(settings.home / "controller" / "decisions.jsonl"),
                },
                config=sim_report.EvalConfig(
                    prompts=preset.eval_prompts, max_new_tokens=preset.eval_tokens, seed=1234 + seed
                ),
            )
        with step("done"):
            print(f"\nreport: {report}\ntotal time: {time.monotonic() - step.started:.0f}s")
        return report
    finally:
        if not keep_up:
            stack.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description="Run one full RLHF loop and write the report.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=os.environ.get("DEMO_PRESET", "cpu"))
    parser.add_argument(
        "--seed", type=int, default=int(os.environ.get("DEMO_SEED", "0")), help="seeds every random choice of the run"
    )
    parser.add_argument("--home", type=Path, default=Path("var/demo"), help="state folder (wiped at start)")
    parser.add_argument("--keep-up", action="store_true", help="leave the stack running afterwards")
    args = parser.parse_args(argv)
    run(args.preset, args.home.resolve(), keep_up=args.keep_up, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
