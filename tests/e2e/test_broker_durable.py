"""The durable embedded broker under a crash, with the whole local stack
running as users run it (`python -m services.stack up`, tiny model):

events of every kind are acknowledged, a dataset snapshot commits its
offsets, more events arrive; then the broker and its object store are
SIGKILLed and `up` restarts them. Every acknowledged event is readable
exactly once, the committed offsets survived, a new SubmitComparison is
acknowledged within 10 s of the restart (the FeedbackService replaced its
fenced producer), a retry of a call that failed during the outage is written
once, and the dataset builder's next snapshot holds every event.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import grpc
import psutil
from kafka import TopicPartition
from rlhf.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc

from services.common import bus
from services.common.auth import bearer
from services.common.broker import free_port
from services.common.config import load_settings
from services.common.datasets import KINDS, SPLITS, SnapshotStore
from services.datasets.builder import build_snapshot
from tests.conftest import MODEL_CACHE

N = 3  # acknowledged events of each kind before the crash
GROUP = "durability-test"


def stack_env(home) -> dict[str, str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RLHF_")},
        "RLHF_HOME": str(home),
        "RLHF_MODEL": "tiny",
        "RLHF_MODEL_CACHE": MODEL_CACHE,
        "RLHF_TRAINER_PRESET": "tiny",
        "RLHF_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "RLHF_BROKER_S3_PORT": str(free_port()),
        "RLHF_CONTROLLER_INTERVAL_S": "3600",
        "RLHF_BROKER_STORAGE": "s3",  # the default, said out loud
    }
    for name in ("POLICY", "REWARD", "FEEDBACK", "HTTP", "PLAYGROUND", "CONTROLLER"):
        env[f"RLHF_{name}_PORT"] = str(free_port())
    for name in ("POLICY", "REWARD", "FEEDBACK"):
        env[f"RLHF_{name}_TARGET"] = f"127.0.0.1:{env[f'RLHF_{name}_PORT']}"
    return env


def ranked(*texts: str) -> list[events_pb2.RankedResponse]:
    return [events_pb2.RankedResponse(text=t, policy_version="base-1", rank=i + 1) for i, t in enumerate(texts)]


def submit_every_kind(stub, tag: str, n: int) -> dict[str, list[str]]:
    """n acknowledged events of each kind; their event ids by kind."""
    ids: dict[str, list[str]] = {kind: [] for kind in KINDS}
    for i in range(n):
        prompt = stub.LogPrompt(
            feedback_pb2.LogPromptRequest(request_id=f"{tag}-p{i}", text=f"{tag}: distinct question number {i}?"),
            metadata=bearer("dev-alice"),
            timeout=10,
        )
        ids["prompts"].append(prompt.event_id)
        lab = bearer("dev-lab1")
        ids["demonstrations"].append(
            stub.SubmitDemonstration(
                feedback_pb2.SubmitDemonstrationRequest(
                    request_id=f"{tag}-d{i}", prompt_id=prompt.event_id, response=f"{tag} demonstration {i}"
                ),
                metadata=lab,
                timeout=10,
            ).event_id
        )
        ids["comparisons"].append(
            stub.SubmitComparison(
                feedback_pb2.SubmitComparisonRequest(
                    request_id=f"{tag}-c{i}", prompt_id=prompt.event_id, responses=ranked("w", "x", "y", "z")
                ),
                metadata=lab,
                timeout=10,
            ).event_id
        )
        ids["labels"].append(
            stub.SubmitLabels(
                feedback_pb2.SubmitLabelsRequest(
                    request_id=f"{tag}-l{i}",
                    prompt_id=prompt.event_id,
                    response=f"{tag} labeled answer {i}",
                    policy_version="base-1",
                    likert=5,
                ),
                metadata=lab,
                timeout=10,
            ).event_id
        )
    return ids


def committed(settings) -> dict[TopicPartition, int | None]:
    consumer = bus.make_consumer(settings, GROUP)
    try:
        topics = bus.Topics.from_settings(settings)
        tps = [TopicPartition(topics.name(k), p) for k in KINDS for p in range(settings.topic_partitions)]
        return {tp: consumer.committed(tp) for tp in tps}
    finally:
        consumer.close()


def snapshot_event_ids(settings, snapshot: str, kind: str) -> set[str]:
    store = SnapshotStore(settings.dataset_dir)
    return {r["event_id"] for split in SPLITS for r in store.read(snapshot, split, kind)}


def test_acknowledged_events_survive_a_broker_sigkill_with_the_whole_stack_running(tmp_path, tiny_model_dir):
    env = stack_env(tmp_path / "home")
    settings = load_settings(env)
    stack = [sys.executable, "-m", "services.stack"]

    def up() -> None:
        done = subprocess.run([*stack, "up", "--timeout", "90"], env=env, capture_output=True, text=True, timeout=150)
        assert done.returncode == 0, done.stdout + done.stderr

    try:
        up()
        channel = grpc.insecure_channel(settings.feedback_target)
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        acked = submit_every_kind(stub, "before", N)
        first = build_snapshot(settings, group_id=GROUP, timeout=60)
        offsets = committed(settings)
        assert sum(o or 0 for o in offsets.values()) == 4 * N
        later = submit_every_kind(stub, "later", 1)  # acknowledged, not yet in a snapshot

        run = tmp_path / "home" / "run"
        for name in ("broker", "broker-store"):  # the machine loses both processes at once
            pid = json.loads((run / f"{name}.pid").read_text())["pid"]
            os.kill(pid, signal.SIGKILL)
            psutil.Process(pid).wait(10)
        lost = feedback_pb2.SubmitComparisonRequest(
            request_id="during-outage", prompt_text="Pick one", responses=ranked("a", "b")
        )
        try:
            stub.SubmitComparison(lost, metadata=bearer("dev-lab1"), timeout=10)
            raise AssertionError("a write was acknowledged with no broker running")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()

        restarted = time.monotonic()
        up()  # restarts the object store and the broker; the services kept running
        fresh = feedback_pb2.SubmitComparisonRequest(
            request_id="after-restart", prompt_text="Pick one", responses=ranked("c", "d")
        )
        reply = None
        while reply is None:
            try:
                reply = stub.SubmitComparison(fresh, metadata=bearer("dev-lab1"), timeout=5)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                assert time.monotonic() - restarted < 10, f"no ack 10 s after the restart: {err.details()}"
                time.sleep(0.2)
        assert time.monotonic() - restarted < 10
        retried = stub.SubmitComparison(lost, metadata=bearer("dev-lab1"), timeout=10)
        again = stub.SubmitComparison(lost, metadata=bearer("dev-lab1"), timeout=10)
        assert again.duplicate and again.event_id == retried.event_id

        # Every acknowledged event exactly once; the committed offsets survived.
        for kind in KINDS:
            counts = Counter(e.event_id for e in bus.read_topic(settings, kind, timeout=30))
            for event_id in acked[kind] + later[kind]:
                assert counts[event_id] == 1, (kind, event_id, counts[event_id])
        assert Counter(e.request_id for e in bus.read_topic(settings, "comparisons"))["during-outage"] == 1
        assert committed(settings) == offsets

        # The builder resumes from its committed offsets and its next snapshot holds everything.
        second = build_snapshot(settings, group_id=GROUP, timeout=60)
        assert second != first
        for kind in KINDS:
            assert set(acked[kind] + later[kind]) <= snapshot_event_ids(settings, second, kind), kind
        assert {reply.event_id, retried.event_id} <= snapshot_event_ids(settings, second, "comparisons")
        channel.close()
    finally:
        subprocess.run([*stack, "down"], env=env, capture_output=True, timeout=120)
