"""The trainer controller: decides when to train, launches jobs in order,
tracks them, and promotes new checkpoints only through the gate.

One round, as in InstructGPT's steps 2 and 3:
  1. build a dataset snapshot (cumulative, paper's data rules applied);
  2. if demonstrations grew enough (or no SFT exists): SFT; the first SFT
     policy replaces the base model as the serving policy;
  3. if comparisons grew enough: train an RM from the SFT model and promote
     it for scoring; train a PPO policy from SFT against it; evaluate the
     candidate and the serving policy on the held-out split with the new RM;
     promote the candidate only if the gate passes, otherwise announce the
     rejection and keep the old policy.

Failed jobs are retried (they resume from their run folder) up to
RLHF_JOB_RETRIES times, then the round stops and the failure is recorded.
Every decision is appended to $RLHF_HOME/controller/decisions.jsonl.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from rlhf.v1 import events_pb2

from services.common import bus
from services.common.checkpoints import CheckpointStore
from services.common.config import Settings, to_env
from services.common.logs import get_logger, log_fields
from services.controller.gate import Evaluation, GateDecision, decide
from services.controller.jobs import Executor, JobSpec, JobState

log = get_logger(__name__)


class JobFailed(RuntimeError):
    pass


@dataclass
class ControllerState:
    round: int = 0
    sft: str = ""
    rm: str = ""
    demonstrations_at_sft: int = 0
    comparisons_at_rm: int = 0
    last_round_unix: float = 0.0
    last_snapshot: str = ""


@dataclass
class RoundReport:
    round: int
    snapshot: str
    trained: dict[str, str] = field(default_factory=dict)
    evaluations: dict[str, dict] = field(default_factory=dict)
    decision: dict = field(default_factory=dict)
    run_dirs: dict[str, str] = field(default_factory=dict)


class Controller:
    def __init__(
        self, settings: Settings, executor: Executor, build_snapshot: Callable[[], str] | None = None, tgi_rollout=None
    ):
        self.settings = settings
        self.executor = executor
        self.tgi_rollout = tgi_rollout  # TgiRollout: TGI follows each promoted policy (RLHF_TGI_DEPLOYMENT)
        self.store = CheckpointStore(settings.checkpoint_dir)
        self.dir = settings.home / "controller"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.runs = settings.home / "runs"
        self.state = self._load_state()
        self._build_snapshot = build_snapshot or self._default_build_snapshot
        self._stop = threading.Event()

    # --- state -----------------------------------------------------------------
    def _load_state(self) -> ControllerState:
        path = self.dir / "state.json"
        if path.exists():
            return ControllerState(**json.loads(path.read_text()))
        return ControllerState()

    def _save_state(self) -> None:
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(asdict(self.state), indent=2))
        tmp.replace(self.dir / "state.json")

    def record(self, kind: str, **fields) -> None:
        entry = {"at_unix_ms": int(time.time() * 1000), "round": self.state.round, "kind": kind, **fields}
        with open(self.dir / "decisions.jsonl", "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        log_fields(log, 20, f"controller {kind}", **fields)

    def decisions(self) -> list[dict]:
        path = self.dir / "decisions.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    # --- data ------------------------------------------------------------------
    def _default_build_snapshot(self) -> str:
        from services.datasets.builder import build_snapshot

        return build_snapshot(self.settings, group_id=f"{self.settings.topic_prefix}-controller")

    def train_counts(self, snapshot: str) -> dict[str, int]:
        from services.common.datasets import SnapshotStore

        counts = SnapshotStore(self.settings.dataset_dir).manifest(snapshot)["counts"]["train"]
        return {"demonstrations": counts["demonstrations"], "comparisons": counts["comparisons"]}

    # --- jobs ------------------------------------------------------------------
    def _overrides(self, trainer: str) -> list[str]:
        args: list[str] = []
        for key, value in (self.settings.trainer_overrides.get(trainer) or {}).items():
            args += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
        return args

    def run_job(self, trainer: str, args: list[str], tag: str) -> dict:
        """Run a trainer job to completion, retrying failures; return its result JSON."""
        name = f"{tag}-r{self.state.round}-{secrets.token_hex(3)}"
        run_dir = self.runs / name
        run_dir.mkdir(parents=True, exist_ok=True)
        result_file = run_dir / "result.json"
        spec = JobSpec(
            name=name,
            trainer=trainer,
            args=[
                *args,
                "--run-dir",
                str(run_dir),
                "--result-file",
                str(result_file),
                "--preset",
                self.settings.trainer_preset,
                *self._overrides(trainer),
            ],
            result_file=str(result_file),
            env=to_env(self.settings),  # a job sees exactly the controller's configuration
            gpus=self.settings.trainer_gpus,
            # Gate evaluation is a single process; training jobs may spread over torchrun.
            nodes=1 if trainer == "evaluate" else self.settings.trainer_nodes,
            procs_per_node=1 if trainer == "evaluate" else self.settings.trainer_procs_per_node,
        )
        attempts = self.settings.job_retries + 1
        for attempt in range(1, attempts + 1):
            handle = self.executor.launch(spec)
            self.record("job_started", job=name, trainer=trainer, attempt=attempt)
            status = self.executor.wait(handle, timeout=self.settings.job_timeout_s)
            if status.state == JobState.RUNNING:
                self.executor.cancel(handle)
                status.message = f"timed out after {self.settings.job_timeout_s:.0f}s"
            if status.state == JobState.SUCCEEDED and result_file.exists():
                result = json.loads(result_file.read_text())
                result["run_dir"] = str(run_dir)
                self.record(
                    "job_succeeded", job=name, trainer=trainer, attempt=attempt, version=result.get("version", "")
                )
                return result
            message = status.message or "finished without a result file"
            self.record("job_failed", job=name, trainer=trainer, attempt=attempt, of=attempts, reason=message)
        raise JobFailed(f"{trainer} job {name} failed {attempts} time(s); see {run_dir}")

    def evaluate(self, policy: str, snapshot: str) -> Evaluation:
        result = self.run_job(
            "evaluate",
            [
                "--policy",
                policy,
                "--reference",
                self.state.sft,
                "--reward",
                self.state.rm,
                "--snapshot",
                snapshot,
                "--split",
                "validation",
            ],
            tag=f"eval-{policy.split('-')[0]}",
        )
        return Evaluation(policy, float(result["mean_reward"]), float(result["kl_to_reference"]), int(result["n"]))

    # --- promotion ---------------------------------------------------------------
    def promote(self, version: str, reason: str) -> None:
        event = bus.promote_checkpoint(self.settings, version, reason)
        self.record("promoted", version=version, reason=reason)
        if self.tgi_rollout is not None and event.role == "policy":
            # The promotion stands either way: the policy service's pointer
            # moved; a TGI that could not be rolled keeps its older weights.
            try:
                rolled = self.tgi_rollout.roll(version)
                self.record(
                    "tgi_rolled" if rolled else "tgi_unchanged", version=version, deployment=self.tgi_rollout.name
                )
            except Exception as err:  # noqa: BLE001 - recorded; the next promotion tries again
                self.record("tgi_roll_failed", version=version, deployment=self.tgi_rollout.name, error=str(err))

    def reject(self, version: str, reason: str) -> None:
        try:
            bus.announce_checkpoint(
                self.settings,
                bus.checkpoint_event(self.settings, version, events_pb2.CheckpointEvent.TYPE_REJECTED, reason),
            )
        except Exception as err:  # noqa: BLE001 - the rejection is recorded locally either way
            log_fields(log, 30, "could not announce the rejection", error=str(err))
        self.record("rejected", version=version, reason=reason)

    # --- the round ---------------------------------------------------------------
    def due(self, counts: dict[str, int]) -> tuple[bool, bool]:
        s = self.settings
        new_demos = counts["demonstrations"] - self.state.demonstrations_at_sft
        new_comps = counts["comparisons"] - self.state.comparisons_at_rm
        scheduled = s.controller_schedule_s > 0 and time.time() - self.state.last_round_unix >= s.controller_schedule_s
        want_sft = counts["demonstrations"] > 0 and (
            not self.state.sft or new_demos >= s.min_new_demonstrations or (scheduled and new_demos > 0)
        )
        want_rl = (
            (bool(self.state.sft) or want_sft)
            and counts["comparisons"] > 0
            and (new_comps >= s.min_new_comparisons or (scheduled and new_comps > 0))
        )
        return want_sft, want_rl

    def step(self, force: bool = False) -> RoundReport | None:
        """Check the data and run one round if it is due (or forced)."""
        snapshot = self._build_snapshot()
        counts = self.train_counts(snapshot)
        want_sft, want_rl = self.due(counts)
        if force:
            want_sft = want_sft or (not self.state.sft and counts["demonstrations"] > 0)
            want_rl = want_rl or (bool(self.state.sft or want_sft) and counts["comparisons"] > 0)
        if not (want_sft or want_rl):
            return None
        self.state.round += 1
        self.state.last_snapshot = snapshot
        report = RoundReport(self.state.round, snapshot)
        self.record("round_started", snapshot=snapshot, counts=counts, sft=want_sft, rl=want_rl)
        try:
            if want_sft:
                self._sft(snapshot, counts, report)
            if want_rl:
                self._rl(snapshot, counts, report)
        except JobFailed as err:
            self.record("round_failed", reason=str(err))
            report.decision = {"promote": False, "reason": str(err)}
        finally:
            self.state.last_round_unix = time.time()
            self._save_state()
        return report

    def _sft(self, snapshot: str, counts: dict[str, int], report: RoundReport) -> None:
        args = ["--snapshot", snapshot]
        result = self.run_job("sft", args, tag="sft")
        self.state.sft = result["version"]
        self.state.demonstrations_at_sft = counts["demonstrations"]
        report.trained["sft"] = result["version"]
        report.run_dirs["sft"] = result["run_dir"]
        serving = self.store.promoted("policy")
        if not serving or self.store.manifest(serving).kind == "base":
            self.promote(result["version"], "first SFT policy replaces the base model")
        self._save_state()

    def _rl(self, snapshot: str, counts: dict[str, int], report: RoundReport) -> None:
        rm = self.run_job("rm", ["--snapshot", snapshot, "--sft", self.state.sft], tag="rm")
        self.state.rm = rm["version"]
        self.state.comparisons_at_rm = counts["comparisons"]
        report.trained["rm"] = rm["version"]
        report.run_dirs["rm"] = rm["run_dir"]
        self.promote(rm["version"], f"new reward model; validation metrics {rm.get('metrics', {})}")
        self._save_state()

        ppo = self.run_job(
            "ppo", ["--snapshot", snapshot, "--sft", self.state.sft, "--reward", self.state.rm], tag="ppo"
        )
        report.trained["ppo"] = ppo["version"]
        report.run_dirs["ppo"] = ppo["run_dir"]
        serving = self.store.promoted("policy") or self.state.sft
        candidate = self.evaluate(ppo["version"], snapshot)
        incumbent = self.evaluate(serving, snapshot)
        report.evaluations = {"candidate": asdict(candidate), "incumbent": asdict(incumbent)}
        decision: GateDecision = decide(
            candidate, incumbent, self.settings.gate_min_reward_gain, self.settings.gate_max_kl
        )
        report.decision = asdict(decision)
        if decision.promote:
            self.promote(ppo["version"], decision.reason)
        else:
            self.reject(ppo["version"], decision.reason)

    # --- the service loop -----------------------------------------------------------
    def run_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception as err:  # noqa: BLE001 - a bad tick must not kill the service
                log.exception("controller tick failed", extra={"fields": {"error": str(err)}})
            self._stop.wait(self.settings.controller_interval_s)

    def stop(self) -> None:
        self._stop.set()
