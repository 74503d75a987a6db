"""The trainer controller: decides when to train, runs each round's jobs in
order, and promotes models only through the gates.

InstructGPT's steps 2 and 3, iterated ("more comparison data is collected on
the current best policy, which is used to train a new RM and then a new
policy"). A round:
  1. builds a dataset snapshot (cumulative, paper's data rules applied);
  2. if demonstrations grew enough (or no SFT exists): SFT; the first SFT
     policy replaces the base model as the serving policy;
  3. if comparisons grew enough: a new RM from SFT on all comparisons so far;
     PPO against that RM, from SFT (RLHF_PPO_INIT=sft, the paper) or from the
     best policy so far (best); the gate job measures both; then the RM gate
     and the policy gate (services/controller/gate.py) decide, and only then
     is anything promoted. Comparisons collected after a promotion sample the
     new policy, and the next round trains on them.

A round is a durable state machine. Its state (snapshot, which jobs finished
and their results, the gate decisions, which promotions were announced) is
written atomically to $RLHF_HOME/controller/state.json after every step. A
controller killed at any point and started again resumes the open round: a
finished job is never run again, a running job is adopted (job names are
deterministic, `<trainer>-r<round>`, and executors find a job by its name),
a decided gate is not re-decided. A job that fails RLHF_JOB_RETRIES + 1 times
leaves the round open with nothing promoted; the next tick retries it.

Every decision, with its numbers, is appended to
$RLHF_HOME/controller/decisions.jsonl and announced on the checkpoints topic
(a PROMOTED or REJECTED CheckpointEvent whose reason is the decision's JSON).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from rlhf.v1 import events_pb2

from services.common import bus
from services.common.checkpoints import CheckpointStore
from services.common.config import Settings, to_env
from services.common.logs import get_logger, log_fields
from services.controller.gate import GateDecision, decide_policy, decide_reward, paired_test
from services.controller.jobs import Executor, JobSpec, JobState
from services.controller.lineage import comparisons_by_policy_version

log = get_logger(__name__)

GATE_MODULE = "services.controller.gate_eval"


class JobFailed(RuntimeError):
    pass


@dataclass
class RoundState:
    """One round, as persisted: enough to resume it after a crash."""

    number: int
    snapshot: str
    counts: dict[str, int]
    sft: bool
    rl: bool
    jobs: dict[str, dict] = field(default_factory=dict)  # step -> the job's result JSON (finished jobs only)
    decisions: list[dict] = field(default_factory=list)  # GateDecision dicts, once decided
    applied: list[str] = field(default_factory=list)  # decisions whose promotion/rejection was announced
    failure: str = ""


@dataclass
class ControllerState:
    round: int = 0
    sft: str = ""
    rm: str = ""  # the serving reward model (the last the RM gate promoted)
    demonstrations_at_sft: int = 0
    comparisons_at_rm: int = 0
    last_round_unix: float = 0.0
    last_snapshot: str = ""
    open_round: dict | None = None  # a RoundState not yet finished


@dataclass
class RoundReport:
    round: int
    snapshot: str
    trained: dict[str, str] = field(default_factory=dict)
    evaluations: dict[str, dict] = field(default_factory=dict)
    decision: dict = field(default_factory=dict)  # the policy gate's decision (or the failure)
    decisions: list[dict] = field(default_factory=list)  # every gate decision of the round
    run_dirs: dict[str, str] = field(default_factory=dict)
    finished: bool = False


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

    def _save_state(self, rs: RoundState | None = None) -> None:
        if rs is not None:
            self.state.open_round = asdict(rs)
        tmp = self.dir / ".state.json.tmp"
        with open(tmp, "w") as fh:
            fh.write(json.dumps(asdict(self.state), indent=2))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.dir / "state.json")

    def record(self, kind: str, **fields) -> None:
        entry = {"at_unix_ms": int(time.time() * 1000), "round": self.state.round, "kind": kind, **fields}
        with open(self.dir / "decisions.jsonl", "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        log_fields(log, logging.INFO, f"controller {kind}", **fields)

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

    def job_spec(self, trainer: str, args: list[str], name: str, module: str = "") -> JobSpec:
        """The JobSpec of one job: the one place a job's command line and environment are made."""
        run_dir = self.runs / name
        result_file = run_dir / "result.json"
        return JobSpec(
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
            nodes=1 if trainer == "gate" else self.settings.trainer_nodes,
            procs_per_node=1 if trainer == "gate" else self.settings.trainer_procs_per_node,
            module=module,
        )

    def run_job(self, trainer: str, args: list[str], name: str, module: str = "") -> dict:
        """Run a job to completion, retrying failures; return its result JSON.

        The name is deterministic, so a job this controller (or an earlier one)
        already finished is not run again, and one still running is adopted.
        """
        spec = self.job_spec(trainer, args, name, module)
        run_dir = self.runs / name
        run_dir.mkdir(parents=True, exist_ok=True)
        result_file = run_dir / "result.json"
        if result_file.exists():  # finished while no controller watched it
            self.record("job_adopted", job=name, trainer=trainer, state="finished")
            return self._result(result_file, run_dir)
        attempts = self.settings.job_retries + 1
        adopt = self.executor.status(name).state in (JobState.RUNNING, JobState.PENDING)
        for attempt in range(1, attempts + 1):
            if adopt:
                self.record("job_adopted", job=name, trainer=trainer, state="running")
                adopt = False
            else:
                self.executor.launch(spec)
                self.record("job_started", job=name, trainer=trainer, attempt=attempt)
            status = self.executor.wait(name, timeout=self.settings.job_timeout_s)
            if status.state == JobState.RUNNING:
                self.executor.cancel(name)
                status.message = f"timed out after {self.settings.job_timeout_s:.0f}s"
            # Trainers write the result file last and atomically: its presence is success,
            # also for an adopted job whose exit status no one could read.
            if result_file.exists() and status.state != JobState.RUNNING:
                result = self._result(result_file, run_dir)
                self.record(
                    "job_succeeded", job=name, trainer=trainer, attempt=attempt, version=result.get("version", "")
                )
                return result
            message = status.message or "finished without a result file"
            self.record("job_failed", job=name, trainer=trainer, attempt=attempt, of=attempts, reason=message)
        raise JobFailed(f"{trainer} job {name} failed {attempts} time(s); see {run_dir}")

    @staticmethod
    def _result(result_file, run_dir) -> dict:
        result = json.loads(result_file.read_text())
        result["run_dir"] = str(run_dir)
        return result

    def _step_job(self, rs: RoundState, step: str, args: list[str], module: str = "") -> dict:
        """A round's job: its result if it finished before (never re-run), else run it now."""
        if step not in rs.jobs:
            rs.jobs[step] = self.run_job(step, args, f"{step}-r{rs.number}", module)
            self._save_state(rs)
        return rs.jobs[step]

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
            log_fields(log, logging.WARNING, "could not announce the rejection", error=str(err))
        self.record("rejected", version=version, reason=reason)

    def _apply(self, rs: RoundState, decision: dict) -> None:
        """Announce one gate decision (once: a resumed round skips what it already announced)."""
        key = f"{decision['model']}:{decision['version']}"
        if key in rs.applied:
            return
        reason = json.dumps(decision, default=str)  # the event carries the numbers, as decisions.jsonl does
        if decision["promote"]:
            self.promote(decision["version"], reason)
            if decision["model"] == "reward":
                self.state.rm = decision["version"]
        else:
            self.reject(decision["version"], reason)
        rs.applied.append(key)
        self._save_state(rs)

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

    def open_round(self) -> RoundState | None:
        return RoundState(**self.state.open_round) if self.state.open_round else None

    def step(self, force: bool = False) -> RoundReport | None:
        """Resume the open round, or check the data and run a new round if one is due (or forced)."""
        rs = self.open_round()
        if rs is not None:
            self.record("round_resumed", snapshot=rs.snapshot, done=sorted(rs.jobs), failure=rs.failure)
        else:
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
            rs = RoundState(self.state.round, snapshot, counts, want_sft, want_rl)
            self._save_state(rs)
            self.record("round_started", snapshot=snapshot, counts=counts, sft=want_sft, rl=want_rl)
        report = RoundReport(rs.number, rs.snapshot)
        try:
            self._advance(rs)
        except JobFailed as err:
            rs.failure = str(err)
            self._save_state(rs)
            self.record("round_failed", reason=str(err), retryable=True, done=sorted(rs.jobs))
            report.decision = {"promote": False, "reason": str(err)}
        else:
            self._finish(rs)
            report.finished = True
        finally:
            self.state.last_round_unix = time.time()
            self._save_state(rs if not report.finished else None)
        self._fill_report(rs, report)
        return report

    def _advance(self, rs: RoundState) -> None:
        if rs.sft:
            sft = self._step_job(rs, "sft", ["--snapshot", rs.snapshot])
            self.state.sft = sft["version"]
            self._save_state(rs)
            serving = self.store.promoted("policy")
            if not serving or self.store.manifest(serving).kind == "base":
                self.promote(sft["version"], "first SFT policy replaces the base model")
        if rs.rl:
            self._rl(rs)

    def _rl(self, rs: RoundState) -> None:
        if "rm" not in rs.jobs:
            by_version = comparisons_by_policy_version(self.settings, rs.snapshot)
            self.record("rm_data", snapshot=rs.snapshot, comparisons_by_policy_version=by_version)
        rm = self._step_job(rs, "rm", ["--snapshot", rs.snapshot, "--sft", self.state.sft])["version"]
        serving = self.store.promoted("policy") or self.state.sft
        ppo_args = ["--snapshot", rs.snapshot, "--sft", self.state.sft, "--reward", rm]
        if (
            self.settings.ppo_init == "best"
            and self.store.exists(serving)
            and self.store.manifest(serving).kind == "ppo"
        ):
            ppo_args += ["--init", serving]
        ppo = self._step_job(rs, "ppo", ppo_args)["version"]
        serving_rm = self.serving_rm()
        gate = self._step_job(
            rs,
            "gate",
            [
                "--candidate",
                ppo,
                "--incumbent",
                serving,
                "--reference",
                self.state.sft,
                "--reward",
                rm,
                *(["--incumbent-reward", serving_rm] if serving_rm else []),
                "--snapshot",
                rs.snapshot,
            ],
            module=GATE_MODULE,
        )
        if not rs.decisions:
            rs.decisions = [d.as_dict() for d in self.decide(gate, rm, ppo)]
            for d in rs.decisions:
                self.record("gate", **d)
            self._save_state(rs)
        for d in rs.decisions:  # the RM first: the policy may be judged by it next round
            self._apply(rs, d)

    def serving_rm(self) -> str:
        """The promoted RM, unless it is the store's untrained seed: that one measures nothing."""
        version = self.store.promoted("reward") or ""
        if version and self.store.manifest(version).metrics.get("untrained"):
            return ""
        return version

    def decide(self, gate: dict, rm: str, ppo: str) -> list[GateDecision]:
        """The two gates applied to the gate job's measurements."""
        s = self.settings
        accuracy = gate["rm_accuracy"]
        new, old = accuracy["new_rm"], accuracy.get("incumbent_rm")
        rm_decision = decide_reward(
            rm,
            new["accuracy"],
            new["pairs"],
            old["version"] if old else "",
            old["accuracy"] if old else None,
            s.gate_rm_tolerance,
        )
        policy = gate["policy"]
        tests = [
            paired_test(
                f"{role} {version}",
                policy["scores"]["candidate"][role],
                policy["scores"]["incumbent"][role],
                s.gate_confidence,
                s.gate_min_reward_gain,
            )
            for role, version in (("new_rm", rm), ("incumbent_rm", old["version"] if old else ""))
            if role in policy["scores"]["candidate"]
        ]
        policy_decision = decide_policy(ppo, policy["incumbent"], tests, policy["mean_kl_to_reference"], s.gate_max_kl)
        return [rm_decision, policy_decision]

    def _finish(self, rs: RoundState) -> None:
        if rs.sft:
            self.state.demonstrations_at_sft = rs.counts["demonstrations"]
        if rs.rl:
            self.state.comparisons_at_rm = rs.counts["comparisons"]
        self.state.open_round = None
        self._save_state()
        self.record(
            "round_finished",
            snapshot=rs.snapshot,
            trained={k: v.get("version", "") for k, v in rs.jobs.items()},
            promoted=[d["version"] for d in rs.decisions if d["promote"]],
        )

    @staticmethod
    def _fill_report(rs: RoundState, report: RoundReport) -> None:
        report.trained = {k: v["version"] for k, v in rs.jobs.items() if v.get("version")}
        report.run_dirs = {k: v["run_dir"] for k, v in rs.jobs.items()}
        report.decisions = list(rs.decisions)
        policy = next((d for d in rs.decisions if d["model"] == "policy"), None)
        if policy is not None:
            report.decision = policy
        gate = rs.jobs.get("gate")
        if gate:
            p = gate["policy"]
            report.evaluations = {
                "rm_accuracy": gate["rm_accuracy"],
                "kl_to_sft": p["mean_kl_to_reference"],
                "prompts": p["prompts"],
                "candidate": p["candidate"],
                "incumbent": p["incumbent"],
            }

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
