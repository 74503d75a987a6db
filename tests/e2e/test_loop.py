"""The closed loop with the tiny model, through the real gRPC services and the
real broker: simulated users and labelers -> controller -> SFT, RM, PPO jobs
(local subprocesses) -> gate -> hot-swap.

It shows a promoted policy being served, a gate rejection leaving the old
policy in place, and a killed job being retried.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

import grpc
from rlhf.v1 import common_pb2, events_pb2, policy_pb2_grpc

from services.common import bus
from services.common.auth import with_token
from services.controller.controller import Controller
from services.controller.local_executor import LocalExecutor
from services.sim import labelers as sim_labelers
from services.sim import users as sim_users
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


def test_closed_loop_promotes_rejects_and_retries(tmp_path, broker, tiny_model_dir):
    from services.feedback.server import start as start_feedback
    from services.policy.server import start as start_policy
    from services.reward.server import start as start_reward

    population = sim_users.make_population(seed=3, n_users=12, n_prompts=60, heavy_users=0, n_labelers=2)
    tokens = population.write_tokens(tmp_path / "tokens.json")
    settings = make_settings(
        tmp_path / "home",
        broker,
        RLHF_TOKENS_FILE=str(tokens),
        RLHF_TRAINER_PRESET="tiny",
        RLHF_JOB_RETRIES="1",
        RLHF_GATE_MIN_REWARD_GAIN="-1000000000",  # round 1: any candidate within the KL budget passes
        RLHF_GATE_MAX_KL="1000000000",
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
    try:
        seed_policy = policy_srv.version
        sim_users.submit_prompts(feedback, population, progress=False)
        pool = sim_labelers.LabelerPool(
            population, feedback, policy, prompts=sim_labelers.read_prompt_events(settings), seed=0
        )
        pool.demonstrate(12, progress=False)

        executor = LocalExecutor(settings.home / "jobs")
        controller = Controller(settings, executor)
        first = controller.step(force=True)
        sft = first.trained["sft"]
        assert _serving(policy, sft), "the first SFT policy was not hot-swapped in"

        pool.compare(10, k=4, max_new_tokens=12, progress=False)
        killed: list[str] = []
        stop = threading.Event()
        killer = threading.Thread(target=_kill_first, args=(executor, "ppo-", killed, stop), daemon=True)
        killer.start()
        second = controller.step(force=True)
        stop.set()
        assert killed, "the PPO job was never seen running"
        log = controller.decisions()
        failed = [d for d in log if d["kind"] == "job_failed" and d["trainer"] == "ppo"]
        assert failed and "SIGKILL" in failed[0]["reason"]
        assert any(d["kind"] == "job_succeeded" and d["trainer"] == "ppo" and d["attempt"] == 2 for d in log)
        ppo = second.trained["ppo"]
        assert second.decision["promote"], second.decision
        assert _serving(policy, ppo), "the promoted PPO policy is not being served"

        strict = Controller(dataclasses.replace(settings, gate_min_reward_gain=1e9), executor)
        third = strict.step(force=True)
        assert not third.decision["promote"] and "did not improve" in third.decision["reason"]
        rejected = third.trained["ppo"]
        time.sleep(2.0)  # give a (wrong) swap the chance to happen
        assert _serving(policy, ppo, timeout=1), "a rejected policy replaced the promoted one"
        assert policy_srv.version == ppo != seed_policy

        events = bus.read_topic(settings, "checkpoints")
        types = {(e.version, events_pb2.CheckpointEvent.Type.Name(e.type)) for e in events}
        assert (ppo, "TYPE_PROMOTED") in types and (rejected, "TYPE_REJECTED") in types
        assert (rejected, "TYPE_CREATED") in types  # the trainer announced it; the gate refused it
    finally:
        for srv in (policy_srv, reward_srv, feedback_srv):
            srv.stop(0)
        feedback.close()
        policy.close()
