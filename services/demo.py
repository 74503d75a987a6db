"""`make demo`: the InstructGPT loop iterated on this machine, through the real
services and the real broker, ending in an evaluation report.

  1. start an isolated local stack (broker, policy, reward, feedback,
     labeling, playground) on free ports, with the simulated population's
     tokens;
  2. simulated users log prompts through FeedbackService;
  3. simulated labelers write demonstrations: tasks the LabelingService drew
     from those logged prompts (the labelers only ever call its front door);
  4. the controller builds a snapshot and trains SFT, which is promoted and
     hot-swapped into the policy service;
  5. then, round after round (DemoPreset.rounds, at least 3):
     a. labelers rank K samples that the LabelingService generated with the
        policy being served: SFT in round 1, after that whatever the previous
        round's gate promoted (the service records each sample's version);
     b. the controller trains a new RM from SFT on every comparison so far,
        PPO against it, measures both in the gate job, and the RM gate and
        the policy gate decide what is promoted;
  6. the report: the final policy against SFT and the base model on the gold
     preference; the labelers' measured agreement beside the RM's accuracy
     against gold and against the labelers; and round by round the served
     policy's gold score, its win rate against SFT, each RM's accuracy, KL,
     the gate decisions, the over-optimisation curves and the lineage of each
     RM's data.

`python -m services.demo --preset cpu|gpu|tiny [--seed N] [--home DIR] [--keep-up]`

Every step is seeded (population, each labeler's noise, the service's
sampling, trainers, evaluation). `--seed` changes all of them at once: runs
with different seeds show how much the results vary. Which labeler takes
which task depends on thread timing, so two runs can differ a little.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from rlhf.v1 import common_pb2, policy_pb2_grpc

from services.common.auth import bearer
from services.common.broker import free_port
from services.common.config import exit_on_config_error, load_settings
from services.common.dtypes import cpu_capability
from services.common.provenance import commit, machine


@dataclass(frozen=True)
class DemoPreset:
    """Sizes of one demo run. `cpu` must finish in about 20 minutes on 2 cores.

    comparisons: tasks labeled per round (an overlapping task counts once per
    labeler), on the policy served at the time; k: samples per comparison
    (RLHF_LABELING_K, 4..9); overlap: share of tasks given to two labelers, to
    measure their agreement; rounds:
    RM+PPO rounds after SFT; ppo_init: "best" continues PPO from the policy the
    last round promoted (RLHF_PPO_INIT), which buys more optimisation per CPU
    minute than restarting from SFT each round as the paper does ("sft"), but
    spends the KL budget round after round; gate_max_kl:
    the policy gate's KL budget (RLHF_GATE_MAX_KL, nats per response; None
    leaves the platform's setting)."""

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
    rounds: int = 3
    overlap: float = 0.2
    ppo_init: str = "best"
    gate_max_kl: float | None = None
    trainer_overrides: dict = field(default_factory=dict)


PRESETS = {
    "cpu": DemoPreset(
        model="base",
        trainer_preset="cpu",
        users=80,
        prompts=900,
        demonstrations=96,
        comparisons=64,
        k=4,
        sample_tokens=48,
        eval_prompts=64,
        eval_tokens=48,
        # Measured by hand on seed 0's first round (2026-12-02, scored like the report): SFT at 1 epoch
        # and lr 2e-4 barely moved the base model (gold win rate 0.57 against it), and PPO at lr 1e-4
        # with one epoch per batch left KL to SFT at 0 after 10 steps. That gave SFT two epochs at 4e-4
        # (replaced below) and PPO 5e-4 with two epochs per batch (still so).
        # 2026-12-04, seed 2's demonstrations (64 for training), the report's scoring: 2 epochs at 4e-4
        # (16 steps) left validation loss at 2.53 and SFT level with the base model (win rate 0.555,
        # gold 0.708 against 0.704); 3 epochs at 1e-3 (24 steps, ~35 s more) reached 1.84 and 0.703
        # [0.582, 0.801] (gold 0.823), and 4 epochs at 8e-4 0.68-0.73 over three training seeds.
        trainer_overrides={
            "sft": {"epochs": 3, "max_steps": 0, "lr": 1e-3},
            # The same run's round-1 RM (42 training comparisons, from that SFT), on 63 held-out
            # comparisons ranked by the gold preference: 1 epoch at 1e-4 (the trainer preset) 0.549
            # [0.491, 0.606]; 3 epochs at 1e-4 0.699; 3 epochs at 3e-4 0.759 [0.706, 0.805], all under
            # the preset's 30-step cap. Capped at 24 here to hold every round, however many comparisons
            # it has, to about 24 steps' time. At that cap the later rounds' RMs barely left a loss of
            # ln 2 (2026-12-04, round 3 of the three seeds: 0.54-0.72 against gold). On round 3's data
            # (about 128 comparisons, 64 held out), against gold, lr 3e-4 on every block / 3e-3 on the
            # last 15 blocks (lora_top_layers) / 3e-3 on every block: seed 1 0.583 / 0.711 / 0.554,
            # seed 2 0.544 / 0.642; 24 steps took 95 s on every block, 74 s on the last 15.
            "rm": {"epochs": 3, "lr": 3e-3, "max_steps": 24, "lora_top_layers": 15},
            # PPO against seed 2's round-3 RM of that kind, from its SFT, gold win rate against SFT on
            # the report's 64 prompts: every block 0.477 (KL 2.4, 119 s), the last 15 blocks 0.578
            # [0.456, 0.691] (KL 1.2, 95 s), the last 15 at lr 1e-3 0.172 (it learned to ramble).
            # GAE's λ = 1 (every token's advantage is the episode's return minus its value; the trainer's
            # default 0.95 leans on the value head for the rest). 2026-12-04, seed 2's SFT and round-2 RM
            # (commit 7dd8f8d), 10 steps, scored on the report's 64 prompts: λ = 0.95 left that RM's mean
            # score where SFT's was (+0.001; gold win rate 0.469), λ = 1 raised it by 0.635 (gold 0.586
            # [0.464, 0.698]). Most likely cause: the value head starts as the RM, trained on whole
            # responses only; on a response's first tokens its values are noise, which 10 steps do not
            # train away, and at 0.95 that noise outweighs the reward carried back from the last token.
            # With the gold score as the reward instead, neither λ gained beyond noise (0.594 at 0.95, 0.453
            # at 1): λ = 1 is here so that PPO follows its reward, not for a measured gold gain.
            "ppo": {"total_steps": 10, "lr": 5e-4, "ppo_epochs": 2, "lora_top_layers": 15, "lam": 1.0},
        },
        # 2026-12-04, the three seeds with the SFT and RM above and the default budget of 20: both RMs
        # passed two candidates that degraded on gold (seed 2 round 3 at KL 6.6: gold 0.546 against
        # SFT's 0.845; seed 1 round 3 at 12.7: 0.672 against 0.794), while the candidates that gained
        # sat at 1.9-4.7, here and in the earlier presets' runs (seed 0 round 1 at 4.7: 0.843 against
        # 0.765). Rerunning seed 2's round-3 PPO at kl_beta 0.1/0.3, lr 2e-4 or with a missing-EOS
        # penalty lost on gold as well: the RM (0.64 against gold) is wrong there, so the gate has to
        # refuse. Chosen on these same seeds.
        gate_max_kl=5.0,
        # From SFT each round, as the paper does, so that every round's candidate has the whole KL
        # budget. 2026-12-04, the three seeds with "best" and the RM and PPO above: round 1's PPO
        # reached KL 2.9-3.5 and was promoted in seeds 0 and 1; the four later candidates, starting
        # there, ended at 4.9-6.5, and three of them were rejected for it.
        ppo_init="sft",
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
        comparisons=12,
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
    overrides["gate"] = {**preset.trainer_overrides.get("gate", {}), "seed": 4321 + seed}
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
            "RLHF_PPO_INIT": preset.ppo_init,
            # The gates measure on validation users: the cpu preset's gate wants 64 of their prompts.
            # At 0.15, seed 0 gave 34 (heavy users are few; where they land decides the count).
            "RLHF_DATASET_VALIDATION_FRACTION": "0.3",
            # The LabelingService: labels go to each split in proportion to its users (the split
            # fractions above), so the gates have held-out comparisons. The demo asks for each kind
            # of task explicitly (demonstrations first, then comparisons every round), so the
            # service's own mix is not used. K samples, all from the served (promoted) policy.
            "RLHF_LABELING_SPLIT_SHARES": "train=0.6,validation=0.3,test=0.1",
            "RLHF_LABELING_DEMONSTRATION_SHARE": "0",
            "RLHF_LABELING_K": str(preset.k),
            "RLHF_LABELING_MAX_NEW_TOKENS": str(preset.sample_tokens),
            "RLHF_LABELING_OVERLAP_SHARE": str(preset.overlap),
            "RLHF_LABELING_POLICY_TARGETS": "",
        }
    )
    if preset.gate_max_kl is not None:
        os.environ["RLHF_GATE_MAX_KL"] = str(preset.gate_max_kl)
    for name in ("POLICY", "REWARD", "FEEDBACK", "LABELING", "HTTP", "PLAYGROUND", "CONTROLLER"):
        os.environ[f"RLHF_{name}_PORT"] = str(free_port())
    for name in ("POLICY", "REWARD", "FEEDBACK", "LABELING"):
        os.environ[f"RLHF_{name}_TARGET"] = f"127.0.0.1:{os.environ[f'RLHF_{name}_PORT']}"


def gate_kl(record) -> float:
    """The candidate's KL to SFT, as the round's gate job measured it."""
    return json.loads((Path(record.run_dirs["gate"]) / "result.json").read_text())["policy"]["mean_kl_to_reference"]


def collect_comparisons(labeling: grpc.Channel, population, preset: DemoPreset, seed: int):
    """One round of comparisons through the LabelingService, on the policy it samples now (the served one).

    Returns (the labelers' run, the policy versions the service recorded for
    the samples judged this round, the service's statistics after it)."""
    from services.sim import labelers as sim_labelers

    token = population.labelers[0].token
    before = sim_labelers.labeling_stats(labeling, token)
    run = sim_labelers.run_labelers(labeling, population.labelers, preset.comparisons, kind="comparison", seed=seed)
    after = sim_labelers.labeling_stats(labeling, token)
    return run, sim_labelers.versions_judged_between(before, after), after


def run(preset_name: str, home: Path, keep_up: bool = False, seed: int = 0) -> Path:
    from services.common.checkpoints import CheckpointStore
    from services.controller.controller import Controller
    from services.controller.local_executor import LocalExecutor
    from services.sim import labelers as sim_labelers
    from services.sim import report as sim_report
    from services.sim import rounds as sim_rounds
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
    step = Step(6 + 2 * preset.rounds)
    stack = Stack(settings, skip=("controller",))  # the demo drives the controller itself, in the open
    executor = LocalExecutor(settings.home / "controller" / "jobs", echo=True)
    try:
        with step("start the local stack"):
            stack.up(timeout=300)
        feedback = grpc.insecure_channel(settings.feedback_target)
        labeling = grpc.insecure_channel(settings.labeling_target)
        watcher = population.labelers[0].token  # GetModelInfo needs a token too

        with step(f"{preset.users} simulated users log {preset.prompts} prompts"):
            sim_users.submit_prompts(feedback, population)
        with step(f"labelers write {preset.demonstrations} demonstrations"):
            queued = sim_labelers.wait_for_prompts(labeling, watcher)
            print(f"  the LabelingService queued {queued} logged prompts (per-user cap and de-duplication applied)")
            demos = sim_labelers.run_labelers(
                labeling, population.labelers, preset.demonstrations, kind="demonstration", seed=seed
            )
            print(f"  {demos.demonstrations} demonstrations in {demos.seconds:.0f}s")

        controller = Controller(settings, executor)
        with step("controller: snapshot -> SFT -> promote"):
            first = controller.step(force=True)
            if not first or "sft" not in first.trained:
                raise SystemExit(f"SFT round failed: {first and first.decision}")
            sft = first.trained["sft"]
            swap_s = wait_for_version(settings.policy_target, sft, watcher)
            print(f"  SFT policy {sft} promoted; hot-swap took {swap_s:.1f}s")

        store = CheckpointStore(settings.checkpoint_dir)
        rounds: list = []
        last = first
        for n in range(1, preset.rounds + 1):
            serving = store.promoted("policy")
            with step(f"round {n}: labelers rank K={preset.k} samples of {serving} for {preset.comparisons} prompts"):
                collected, collected_on, stats = collect_comparisons(labeling, population, preset, seed)
                print(
                    f"  {collected.comparisons} comparisons on {', '.join(collected_on)}; labeler agreement so far "
                    f"{stats.pairwise_agreement:.3f} over {stats.compared_pairs} response pairs"
                )
            with step(f"round {n}: controller: snapshot -> RM -> PPO -> gate job -> RM gate, policy gate"):
                last = controller.step(force=True)
                if not last or not last.finished:
                    raise SystemExit(f"round {n} failed: {last and last.decision}")
                for d in last.decisions:
                    print(f"  {d['model']} gate: {d['reason']}")
                served = store.promoted("policy")
                print(f"  serving {served} (hot-swap {wait_for_version(settings.policy_target, served, watcher):.1f}s)")
            rounds.append(
                sim_rounds.RoundRecord(
                    round=n,
                    collected_on=collected_on,
                    comparisons=collected.comparisons,
                    rm=last.trained["rm"],
                    candidate=last.trained["ppo"],
                    served_after=served,
                    decisions=last.decisions,
                    run_dirs=last.run_dirs,
                    labeler_agreement=stats.pairwise_agreement if stats.compared_pairs else None,
                    agreement_pairs=stats.compared_pairs,
                )
            )

        with step("evaluate against the gold labeler and write the report"):
            base = next((m.version for m in store.list(role="policy") if m.kind == "base"), None)
            final = store.promoted("policy")
            ppo = final if store.manifest(final).kind == "ppo" else rounds[-1].candidate
            eval_cfg = sim_report.EvalConfig(
                prompts=preset.eval_prompts, max_new_tokens=preset.eval_tokens, seed=1234 + seed
            )
            report = sim_report.write_report(
                settings,
                home / "report",
                base_version=base,
                sft_version=sft,
                ppo_version=ppo,
                rm_version=store.promoted("reward") or last.trained["rm"],
                snapshot_id=last.snapshot,
                run_dirs={
                    **{k: Path(v) for k, v in first.run_dirs.items()},
                    **{k: Path(v) for k, v in last.run_dirs.items() if k != "gate"},
                },
                extra={
                    "preset": asdict(preset) | {"name": preset_name, "seed": seed},
                    "final_policy": final,
                    "ppo_is_served": ppo == final,
                    "kl_to_sft": next((gate_kl(r) for r in reversed(rounds) if r.candidate == ppo), None),
                    "timings_s": step.timings,
                    "cpu_capability": cpu_capability(),
                    "machine": machine(),
                    "commit": commit(),
                    "date": time.strftime("%Y-%m-%d", time.gmtime()),
                    "controller_decisions": str(settings.home / "controller" / "decisions.jsonl"),
                },
                config=eval_cfg,
                labeler_agreement=sim_labelers.agreement_summary(
                    sim_labelers.labeling_stats(labeling, population.labelers[0].token)
                ),
            )
            sim_rounds.write_rounds(
                settings, home / "report", rounds, sft_version=sft, snapshot_id=last.snapshot, config=eval_cfg
            )
        with step("done"):
            print(f"\nreport: {report}\ntotal time: {time.monotonic() - step.started:.0f}s")
            data = json.loads((home / "report" / "report.json").read_text())
            data["total_wall_s"] = round(time.monotonic() - step.started, 1)
            (home / "report" / "report.json").write_text(json.dumps(data, indent=2, default=str))
        return report
    finally:
        if not keep_up:
            for job in executor.running():  # a run stopped mid-round: its trainer job has nobody to report to
                executor.cancel(job)
            stack.down()


def stop_on_termination() -> None:
    """SIGTERM and SIGHUP (a `kill`, a closed terminal, a cancelled CI job) end the demo like Ctrl-C does:
    through `run`'s cleanup, which takes its stack and trainer jobs down. The default action would end
    the process at once and leave them running, each in its own session, holding ports and memory."""

    def stop(signum, _frame):
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the cleanup short
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make demo", description="Run SFT and iterated RM+PPO rounds, and write the report."
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default=os.environ.get("DEMO_PRESET", "cpu"))
    parser.add_argument(
        "--seed", type=int, default=int(os.environ.get("DEMO_SEED", "0")), help="seeds every random choice of the run"
    )
    parser.add_argument("--home", type=Path, default=Path("var/demo"), help="state folder (wiped at start)")
    parser.add_argument("--keep-up", action="store_true", help="leave the stack running afterwards")
    args = parser.parse_args(argv)
    stop_on_termination()
    run(args.preset, args.home.resolve(), keep_up=args.keep_up, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
