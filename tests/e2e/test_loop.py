"""The loop iterates, with the tiny model, through the real gRPC services and
the real broker: simulated users -> LabelingService (tasks from their logged
prompts, samples from the served policy) <- simulated labelers -> controller
-> SFT, then two RM+PPO rounds (local subprocess jobs) -> gates -> hot-swap.

It shows:
  - round 2's comparisons come from round 1's promoted policy (the versions the
    LabelingService recorded for the samples it generated), and round 2's RM
    trained on them (read from lineage);
  - a killed job is retried and resumes;
  - a PPO that keeps failing leaves its round open and retryable, with
    nothing promoted ahead of it;
  - a controller SIGKILLed mid-round, restarted, finishes that round without
    re-running a finished job (it adopts the running one);
  - a rejected policy is never served.

Which gate decisions are real here: the RM gate of the second RL round is
decided on the measured held-out accuracies (tolerance 0) and the test checks
the decision follows them, whichever way it goes. The policy gate is forced by
configuration, because the tiny model learns nothing measurable: round 1 by a
minimum gain of -1e9 (so that round 2 can sample its promoted policy), round 2
by +1e9 (a rejection). The paired test itself is unit-tested in
tests/unit/test_controller_gate.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
from rlhf.v1 import common_pb2, events_pb2, policy_pb2_grpc

from services.common import bus
from services.common.auth import with_token
from services.common.broker import free_port
from services.common.checkpoints import CheckpointStore
from services.common.config import to_env
from services.common.datasets import SnapshotStore
from services.controller.controller import Controller
from services.controller.lineage import lineage
from services.controller.local_executor import LocalExecutor
from services.sim import users as sim_users
from services.sim.labelers import labeling_stats, run_labelers, versions_judged_between
from tests.conftest import make_settings


def _serving(channel, version: str, timeout: float = 60.0) -> bool:
    stub = policy_pb2_grpc.PolicyServiceStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).version == version:
            return True
        time.sleep(0.3)
    return False


def _kill_first(executor: LocalExecutor, prefix: str, killed: list, stop: threading.Event) -> None:
    """SIGKILL the first job whose name starts with `prefix`, once it has run a moment."""
    while not stop.is_set():
        for name, pid in executor.running().items():
            if name.startswith(prefix):
                time.sleep(1.0)
                os.kill(pid, signal.SIGKILL)
                killed.append(name)
                return
        time.sleep(0.1)


def _compare(labeling, population, n: int) -> list[str]:
    """n comparisons through the LabelingService; the policy versions it recorded for their samples."""
    token = population.labelers[0].token
    before = labeling_stats(labeling, token)
    run = run_labelers(labeling, population.labelers, n, kind="comparison", wait_s=30, progress=False)
    assert run.comparisons == n and run.duplicates == 0, run
    return versions_judged_between(before, labeling_stats(labeling, token))


def _log(settings) -> list[dict]:
    path = settings.home / "controller" / "decisions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(settings, predicate, what: str, count: int = 1, timeout: float = 240.0) -> None:
    """Until at least `count` decisions satisfy `predicate`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(1 for d in _log(settings) if predicate(d)) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; decisions: {_log(settings)[-5:]}")


def _controller_process(settings) -> subprocess.Popen:
    """`python -m services.controller` as a service, with exactly these settings."""
    env = {
        **os.environ,
        **to_env(settings),
        "RLHF_CONTROLLER_INTERVAL_S": "1",
        "RLHF_CONTROLLER_PORT": str(free_port()),
    }
    log = open(settings.home / "controller-service.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "services.controller"], env=env, stdout=log, stderr=subprocess.STDOUT
    )


def test_two_rounds_iterate_gate_and_recover(tmp_path, broker, tiny_model_dir):
    from services.feedback.server import start as start_feedback
    from services.labeling.server import start as start_labeling
    from services.policy.server import start as start_policy
    from services.reward.server import start as start_reward

    population = sim_users.make_population(seed=3, n_users=12, n_prompts=80, heavy_users=0, n_labelers=2)
    tokens = population.write_tokens(tmp_path / "tokens.json")
    settings = make_settings(
        tmp_path / "home",
        broker,
        RLHF_TOKENS_FILE=str(tokens),
        RLHF_TRAINER_PRESET="tiny",
        RLHF_JOB_RETRIES="1",
        RLHF_GATE_MIN_REWARD_GAIN="-1000000000",  # round 1: forced pass (see the module docstring)
        RLHF_GATE_MAX_KL="1000000000",
        RLHF_GATE_RM_TOLERANCE="0",
        RLHF_DATASET_VALIDATION_FRACTION="0.3",  # enough held-out users for both gates with 12 users
    )
    bus.create_topics(settings)
    feedback_srv, policy_srv, reward_srv = (
        start_feedback(settings),
        start_policy(settings, http_port=None),
        start_reward(settings),
    )
    feedback = grpc.insecure_channel(f"127.0.0.1:{feedback_srv.port}")
    policy = with_token(grpc.insecure_channel(f"127.0.0.1:{policy_srv.port}"), population.labelers[0].token)
    settings = dataclasses.replace(
        settings, policy_target=f"127.0.0.1:{policy_srv.port}", feedback_target=f"127.0.0.1:{feedback_srv.port}"
    )
    # Labels per split in proportion to its users; no overlap, so that every task is labeled within its round
    # (agreement has its own tests); the test asks for each kind of task itself.
    labeling_srv = start_labeling(
        dataclasses.replace(
            settings,
            labeling_split_shares={"train": 0.6, "validation": 0.3, "test": 0.1},
            labeling_overlap_share=0.0,
            labeling_demonstration_share=0.0,
            labeling_k=4,
            labeling_max_new_tokens=12,
        )
    )
    labeling = grpc.insecure_channel(f"127.0.0.1:{labeling_srv.port}")
    service = None
    try:
        sim_users.submit_prompts(feedback, population, progress=False)
        demos = run_labelers(labeling, population.labelers, 12, kind="demonstration", wait_s=30, progress=False)
        assert demos.demonstrations == 12
        executor = LocalExecutor(settings.home / "controller" / "jobs")
        controller = Controller(settings, executor)
        sft = controller.step(force=True).trained["sft"]
        assert _serving(policy, sft), "the first SFT policy was not hot-swapped in"

        # --- RL round 1, on comparisons of SFT samples; its first PPO attempt is killed ---
        assert _compare(labeling, population, 10) == [sft]
        killed: list[str] = []
        stop = threading.Event()
        threading.Thread(target=_kill_first, args=(executor, "ppo-", killed, stop), daemon=True).start()
        first = controller.step(force=True)
        stop.set()
        assert killed == ["ppo-r2"] and first.finished
        log = _log(settings)
        failed = [d for d in log if d["kind"] == "job_failed" and d["job"] == "ppo-r2"]
        assert failed and "SIGKILL" in failed[0]["reason"]
        assert any(d["kind"] == "job_succeeded" and d["job"] == "ppo-r2" and d["attempt"] == 2 for d in log)
        ppo1, rm1 = first.trained["ppo"], first.trained["rm"]
        store = CheckpointStore(settings.checkpoint_dir)
        # The store's untrained seed RM measures nothing: the first trained RM replaces it, and the
        # first policy gate has only the new RM to test with, and says so.
        assert [d["promote"] for d in first.decisions] == [True, True], first.decisions
        assert "first reward model" in first.decisions[0]["reason"]
        assert "no previous RM" in first.decisions[1]["reason"]
        serving_rm = rm1
        assert store.promoted("reward") == serving_rm
        assert _serving(policy, ppo1), "round 1's promoted policy is not being served"

        # --- RL round 2: comparisons on round 1's policy; its PPO fails every attempt ---
        assert _compare(labeling, population, 10) == [ppo1]
        broken = Controller(dataclasses.replace(settings, trainer_overrides={"ppo": {"no_such_key": 1}}), executor)
        failing = broken.step(force=True)
        assert not failing.finished and "ppo job ppo-r3 failed 2 time(s)" in failing.decision["reason"]
        assert store.promoted("reward") == serving_rm, "the round's new RM was promoted before its PPO succeeded"
        assert store.promoted("policy") == ppo1
        state = json.loads((settings.home / "controller" / "state.json").read_text())
        assert state["open_round"]["number"] == 3 and sorted(state["open_round"]["jobs"]) == ["rm"]
        assert state["comparisons_at_rm"] == first_counts(log, round_=2)

        # --- the round is retried by the controller service, which is SIGKILLed mid-PPO and restarted ---
        fixed = dataclasses.replace(settings, gate_min_reward_gain=1e9)  # round 2: forced rejection
        service = _controller_process(fixed)
        ppo_started = lambda d: d["kind"] == "job_started" and d["job"] == "ppo-r3"  # noqa: E731 - a local predicate
        launches = sum(1 for d in _log(settings) if ppo_started(d))
        _wait_for(settings, ppo_started, "the retried PPO job to start", count=launches + 1)
        service.send_signal(signal.SIGKILL)
        service.wait(30)
        service = _controller_process(fixed)
        _wait_for(settings, lambda d: d["kind"] == "round_finished" and d["round"] == 3, "round 2 to finish")
        service.send_signal(signal.SIGTERM)
        service.wait(60)
        service = None

        log = _log(settings)
        starts = [d["job"] for d in log if d["kind"] == "job_started"]
        assert starts.count("rm-r3") == 1, "the finished RM job was run again"
        assert starts.count("ppo-r3") == launches + 1, "the PPO job was launched again instead of adopted"
        assert starts.count("gate-r3") == 1
        assert any(d["kind"] == "job_adopted" and d["job"] == "ppo-r3" for d in log)
        assert [d["kind"] for d in log].count("round_finished") == 3
        round2 = [d for d in log if d["kind"] == "gate" and d["round"] == 3]
        reward, policy_decision = round2
        assert reward["model"] == "reward" and policy_decision["model"] == "policy"
        # The RM gate is real: its decision follows the measured accuracies on the same pairs.
        assert reward["numbers"]["incumbent"] == serving_rm
        _rm_gate_follows_its_numbers(reward)
        assert store.promoted("reward") == (reward["version"] if reward["promote"] else serving_rm)
        # Two paired tests: the RM PPO optimised and the previous one, which it did not see.
        assert [t["rm"].split()[0] for t in policy_decision["numbers"]["tests"]] == ["new_rm", "incumbent_rm"]
        assert not policy_decision["promote"] and "no significant gain" in policy_decision["reason"]
        rejected = policy_decision["version"]
        time.sleep(2.0)  # give a (wrong) swap the chance to happen
        assert _serving(policy, ppo1, timeout=1) and policy_srv.version == ppo1, "a rejected policy is served"

        # --- lineage: round 2's RM trained on comparisons produced by round 1's promoted policy ---
        chain = lineage(store, SnapshotStore(settings.dataset_dir), rejected, settings.home / "runs")
        assert chain["reward_model"]["version"] == reward["version"]
        by_version = chain["comparisons_by_policy_version"]
        assert by_version.get(ppo1, 0) > 0 and by_version.get(sft, 0) > 0, by_version
        assert chain["ppo_run"]["run_dir"].endswith("ppo-r3")
        first_chain = lineage(store, SnapshotStore(settings.dataset_dir), ppo1, settings.home / "runs")
        assert set(first_chain["comparisons_by_policy_version"]) == {sft}

        # --- every decision, with its numbers, is on the checkpoints topic ---
        events = bus.read_topic(settings, "checkpoints")
        reasons = {
            (e.version, events_pb2.CheckpointEvent.Type.Name(e.type)): e.reason
            for e in events
            if e.type in (events_pb2.CheckpointEvent.TYPE_PROMOTED, events_pb2.CheckpointEvent.TYPE_REJECTED)
        }
        assert json.loads(reasons[(ppo1, "TYPE_PROMOTED")])["numbers"]["tests"][0]["n"] > 0
        assert json.loads(reasons[(rejected, "TYPE_REJECTED")])["model"] == "policy"
        assert (reward["version"], "TYPE_PROMOTED" if reward["promote"] else "TYPE_REJECTED") in reasons
    finally:
        if service is not None:
            service.kill()
            service.wait()
        labeling.close()
        labeling_srv.stop()
        for srv in (policy_srv, reward_srv, feedback_srv):
            srv.stop(0)
        feedback.close()
        policy.close()


def _rm_gate_follows_its_numbers(decision: dict) -> None:
    n = decision["numbers"]
    assert decision["model"] == "reward" and n["pairs"] > 0, decision
    assert decision["promote"] == (n["accuracy"] >= n["incumbent_accuracy"] - n["tolerance"]), decision


def first_counts(log: list[dict], round_: int) -> int:
    """The comparisons count the controller recorded when round `round_` started."""
    return next(d["counts"]["comparisons"] for d in log if d["kind"] == "round_started" and d["round"] == round_)
