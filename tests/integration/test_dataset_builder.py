"""The dataset builder against a real broker, fed through the real
FeedbackService: the data rules, dead letters, cumulative snapshots, and a
SIGKILL between the snapshot write and the offset commit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import grpc
import pytest
from rlhf.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc

from services.common import bus
from services.common.auth import bearer
from services.common.config import load_settings
from services.common.datasets import KINDS, SPLITS, SnapshotStore
from services.datasets import inspect
from services.datasets.builder import build_snapshot
from services.datasets.rules import RuleParams, split_of
from services.feedback.server import start
from tests.conftest import MODEL_CACHE

ROOT = Path(__file__).resolve().parents[2]
USERS = [f"u{i:02d}" for i in range(40)]
PII = "mail {u}@example.com or call 555-010-{j:04d}"
LONG = (
    "Please write a thorough, well structured report about the economic history of the Hanseatic League and its trade"
)


def env_for(home: Path, broker: str) -> dict[str, str]:
    tokens = [f"tok-{u}={u}:user" for u in [*USERS, "heavy", "late"]] + [
        "tok-lab1=lab1:labeler",
        "tok-lab2=lab2:labeler",
    ]
    return {
        "RLHF_HOME": str(home),
        "RLHF_MODEL": "tiny",
        "RLHF_MODEL_CACHE": MODEL_CACHE,
        "RLHF_KAFKA_BOOTSTRAP": broker,
        "RLHF_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}",
        "RLHF_TOPIC_PARTITIONS": "3",
        "RLHF_TOKENS": ",".join(tokens),
        "RLHF_DATASET_VALIDATION_FRACTION": "0.2",
        "RLHF_DATASET_TEST_FRACTION": "0.2",
        "RLHF_LOG_LEVEL": "INFO",
    }


def bulk(stub, token: str, items) -> list[feedback_pb2.SubmitReply]:
    return list(stub.BulkSubmit(iter(list(items)), metadata=bearer(token), timeout=60))


def prompt_item(request_id: str, text: str) -> feedback_pb2.BulkItem:
    return feedback_pb2.BulkItem(prompt=feedback_pb2.LogPromptRequest(request_id=request_id, text=text))


@pytest.fixture(scope="module")
def world(broker, tmp_path_factory):
    env = env_for(tmp_path_factory.mktemp("datasets") / "home", broker)
    settings = load_settings(env)
    handle = start(settings)
    channel = grpc.insecure_channel(f"127.0.0.1:{handle.port}")
    stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
    prompt_ids: dict[str, list[str]] = {}
    for u in USERS:
        replies = bulk(
            stub,
            f"tok-{u}",
            [prompt_item(f"{u}-{j}", f"Question {j} of {u}: " + PII.format(u=u, j=j)) for j in range(3)],
        )
        prompt_ids[u] = [r.event_id for r in replies]
    bulk(stub, "tok-heavy", [prompt_item(f"h-{i}", f"Heavy user prompt number {i}") for i in range(205)])
    dup_first = bulk(stub, "tok-u00", [prompt_item("long-a", LONG + " routes in the Baltic.")])[0].event_id
    dup_second = bulk(stub, "tok-u01", [prompt_item("long-b", LONG.upper() + " ROUTES IN THE NORTH SEA.")])[0].event_id
    labeled = []
    for u in USERS:
        pid = prompt_ids[u][0]
        responses = [
            events_pb2.RankedResponse(
                text=f"answer {k} for {u}, write to {u}@example.com", policy_version="base-1", rank=r
            )
            for k, r in enumerate((1, 2, 2, 4))
        ]  # with a tie
        labeled += [
            feedback_pb2.BulkItem(
                demonstration=feedback_pb2.SubmitDemonstrationRequest(
                    request_id=f"d-{u}", prompt_id=pid, response=f"Demo for {u}: {u}@example.com"
                )
            ),
            feedback_pb2.BulkItem(
                comparison=feedback_pb2.SubmitComparisonRequest(request_id=f"c-{u}", prompt_id=pid, responses=responses)
            ),
        ]
    labeled.append(
        feedback_pb2.BulkItem(
            demonstration=feedback_pb2.SubmitDemonstrationRequest(
                request_id="d-orphan", prompt_id="ev-not-logged-yet", response="x"
            )
        )
    )
    bulk(stub, "tok-lab1", labeled)
    # A retry of a logged prompt after a service restart (the cache forgot it): same event id, second record.
    topics = bus.Topics.from_settings(settings)
    producer = bus.make_producer(settings)
    copy = events_pb2.PromptEvent(
        event_id=prompt_ids["u05"][1],
        prompt_id=prompt_ids["u05"][1],
        user_id="u05",
        text="Question 1 of u05: " + PII.format(u="u05", j=1),
        created_unix_ms=int(time.time() * 1000),
    )
    bus.publish(producer, topics, "prompts", "u05", copy, 10)
    # Malformed records written by some other producer.
    producer.send(topics.name("prompts"), key=b"x", value=b"\xff\x00not a protobuf").get(10)
    bus.publish(
        producer,
        topics,
        "prompts",
        "x",
        events_pb2.PromptEvent(event_id="ev-no-user", prompt_id="ev-no-user", text="t"),
        10,
    )
    producer.close()
    yield dict(settings=settings, env=env, stub=stub, prompt_ids=prompt_ids, dup=(dup_first, dup_second))
    channel.close()
    handle.stop()


def all_records(store: SnapshotStore, snapshot_id: str, kind: str) -> dict[str, list[dict]]:
    return {split: store.read(snapshot_id, split, kind) for split in SPLITS}


def test_first_snapshot_applies_the_rules(world):
    settings = world["settings"]
    store = SnapshotStore(settings.dataset_dir)
    snapshot = build_snapshot(settings, group_id="g-main", timeout=60)
    manifest = store.manifest(snapshot)
    prompts = all_records(store, snapshot, "prompts")

    # Splits share no user, and each user is where the hash puts them.
    users = {split: {r["user_id"] for kind in KINDS for r in store.read(snapshot, split, kind)} for split in SPLITS}
    assert users["train"] and users["validation"] and users["test"]
    assert (
        not users["train"] & users["validation"]
        and not users["train"] & users["test"]
        and not users["validation"] & users["test"]
    )
    params = RuleParams.from_settings(settings)
    assert all(split_of(u, params) == split for split in SPLITS for u in users[split])

    # The 200-prompt cap holds (the heavy user logged 205).
    per_user = Counter(r["user_id"] for split in SPLITS for r in prompts[split])
    assert per_user["heavy"] == 200 and max(per_user.values()) == 200

    # Prefix dedup: the later prompt sharing a long prefix is gone, the first stays.
    ids = {r["event_id"] for split in SPLITS for r in prompts[split]}
    assert world["dup"][0] in ids and world["dup"][1] not in ids

    # PII is gone from train and untouched elsewhere.
    for split in SPLITS:
        for kind in ("prompts", "demonstrations", "comparisons"):
            for record in store.read(snapshot, split, kind):
                text = json.dumps(record)
                if split == "train":
                    assert "@example.com" not in text and "555-010" not in text, record
                elif record["user_id"] in USERS:
                    assert "@example.com" in text, record
    assert manifest["rules"]["pii_replacements"] > 0

    # No duplicates (the re-published prompt counts once), feedback inherits its prompt's user.
    for kind in KINDS:
        event_ids = [r["event_id"] for split in SPLITS for r in store.read(snapshot, split, kind)]
        assert len(event_ids) == len(set(event_ids)), kind
    demos = all_records(store, snapshot, "demonstrations")
    for split in SPLITS:
        for demo in demos[split]:
            assert (
                demo["user_id"] in USERS and demo["labeler_id"] == "lab1" and split_of(demo["user_id"], params) == split
            )
    assert sum(len(v) for v in demos.values()) == len(USERS)
    assert manifest["rules"]["pending_unknown_prompt"] == {"demonstrations": 1}
    assert manifest["counts"]["train"]["comparisons"] + manifest["counts"]["validation"]["comparisons"] + manifest[
        "counts"
    ]["test"]["comparisons"] == len(USERS)

    # Malformed records went to the dead-letter topic with a reason.
    report = inspect.inspect_topics(settings)
    assert report["topics"]["deadletter"]["records"] == 2
    assert set(report["deadletter_reasons"]) == {"undecodable rlhf.v1.PromptEvent", "invalid prompts event"}
    assert report["k_histogram"] == {"4": len(USERS)}
    snap = inspect.inspect_snapshot(settings, snapshot)
    assert snap["k_histogram"] == {"4": len(USERS)} and snap["comparisons_with_ties"] == len(USERS)
    world["first"] = snapshot


def test_builder_killed_between_write_and_commit_restarts_to_the_same_snapshot(world):
    settings, env = world["settings"], world["env"]
    # New data since the first build, so this build writes a new snapshot.
    bulk(world["stub"], "tok-late", [prompt_item(f"late-{i}", f"Late prompt {i}") for i in range(5)])
    marker = Path(settings.home) / "paused"
    child_env = {**{k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}, **env}
    command = [sys.executable, "-m", "services.datasets", "build", "--group", "g-crash", "--timeout", "60"]
    child = subprocess.Popen(
        [*command, "--pause-before-commit", str(marker)],
        cwd=ROOT,
        env=child_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), child.stderr.read() if child.poll() is not None else "builder never paused"
        written = marker.read_text()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    store = SnapshotStore(settings.dataset_dir)
    assert store.manifest(written)["counts"]  # the snapshot is durable
    assert committed_offsets(settings, "g-crash") == {None}  # ...and no offset was committed

    rerun = subprocess.run(command, cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.strip().splitlines()[-1] == written
    built = [json.loads(line) for line in rerun.stderr.splitlines() if '"dataset snapshot built"' in line][-1]
    assert (
        built["added"] == 0 and built["duplicates"] == built["read"] - 2
    )  # everything re-read, de-duplicated by event id
    assert None not in committed_offsets(settings, "g-crash")
    for kind in KINDS:
        ids = [r["event_id"] for split in SPLITS for r in store.read(written, split, kind)]
        assert len(ids) == len(set(ids))
    world["crash"] = written


def test_snapshots_are_cumulative_and_users_never_move(world):
    settings = world["settings"]
    store = SnapshotStore(settings.dataset_dir)
    second = build_snapshot(settings, group_id="g-main", timeout=60)
    assert second == world["crash"]  # same events, same rules: the same snapshot, whichever group built it
    first = world["first"]
    for split in SPLITS:
        before = {r["event_id"] for r in store.read(first, split, "prompts")}
        after = {r["event_id"] for r in store.read(second, split, "prompts")}
        assert before <= after
    assert (
        sum(store.manifest(second)["counts"][s]["prompts"] for s in SPLITS)
        == sum(store.manifest(first)["counts"][s]["prompts"] for s in SPLITS) + 5
    )
    assert build_snapshot(settings, group_id="g-main", timeout=60) == second  # nothing new: same snapshot

    child_env = {**{k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}, **world["env"]}
    shown = subprocess.run(
        [sys.executable, "-m", "services.datasets", "inspect", "snapshot", "--json"],
        cwd=ROOT,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert (
        report["snapshot_id"] == second
        and report["prompts_per_user"][split_of("heavy", RuleParams.from_settings(settings))]["heavy"] == 200
    )


def committed_offsets(settings, group: str) -> set:
    from kafka import TopicPartition

    consumer = bus.make_consumer(settings, group)
    try:
        names = [bus.Topics.from_settings(settings).name(k) for k in KINDS]
        return {consumer.committed(TopicPartition(n, p)) for n in names for p in consumer.partitions_for_topic(n)}
    finally:
        consumer.close()
