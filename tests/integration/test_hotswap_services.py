"""Checkpoint hot-swap through real announcements on a real broker: the policy
swaps under streaming load with no failed request, in-flight streams finish
on the old version; corrupt or incompatible checkpoints are rejected and the
old version keeps serving; the reward service follows its own role."""

from __future__ import annotations

import shutil
import threading
import time

import grpc
import pytest
from rlhf.v1 import events_pb2, policy_pb2, policy_pb2_grpc, reward_pb2, reward_pb2_grpc

from services.common.auth import with_token
from services.common.bus import announce_checkpoint, checkpoint_event, promote_checkpoint
from services.common.checkpoints import CheckpointStore
from services.common.models import RewardModel, load_tokenizer
from services.policy.server import start as start_policy
from services.reward.server import start as start_reward
from tests.conftest import make_settings


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def copy_policy(store: CheckpointStore, source, kind="sft", change_tokenizer=False) -> str:
    with store.stage(kind, parents=["base-tiny-seed"]) as (folder, manifest):
        for path in source.iterdir():
            if path.is_file() and path.name != "manifest.json":
                shutil.copy2(path, folder / path.name)
        if change_tokenizer:
            tok = load_tokenizer(source)
            tok.add_tokens(["<|new-token|>"])
            tok.save_pretrained(folder)
    return manifest.version


def announce_promoted(settings, version):
    """Announce without the promote helper, whose verify() would refuse a corrupt checkpoint."""
    announce_checkpoint(settings, checkpoint_event(settings, version, events_pb2.CheckpointEvent.TYPE_PROMOTED, "test"))


@pytest.fixture
def policy(tmp_path, broker, tiny_model_dir):
    settings = make_settings(tmp_path, broker, RLHF_TOKENS="usr=u1:user")
    handle = start_policy(settings, port=0, http_port=None)
    assert handle.backend.switcher.following
    channel = with_token(grpc.insecure_channel(f"127.0.0.1:{handle.port}"), "usr")
    yield settings, handle, policy_pb2_grpc.PolicyServiceStub(channel)
    channel.close()
    handle.stop()


def test_swap_under_streaming_load_has_no_failures(policy, tiny_model_dir):
    settings, handle, stub = policy
    store = CheckpointStore(settings.checkpoint_dir)
    old = handle.version
    new = copy_policy(store, store.path(old))
    results, errors = [], []
    started = threading.Barrier(5)

    def stream():
        try:
            it = stub.GenerateStream(
                policy_pb2.GenerateRequest(
                    prompt="Tell me a story",
                    parameters=policy_pb2.GenerationParameters(max_new_tokens=150, temperature=0.0),
                ),
                timeout=60,
            )
            first = next(it)
            started.wait()
            results.append({first.model_version} | {m.model_version for m in it})
        except Exception as err:  # noqa: BLE001 - any failure in the thread fails the test below
            errors.append(err)
            started.abort()

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait(timeout=30)
    announced = time.monotonic()
    promote_checkpoint(settings, new, reason="test")
    assert wait_for(
        lambda: (
            stub.Generate(
                policy_pb2.GenerateRequest(prompt="x", parameters=policy_pb2.GenerationParameters(max_new_tokens=1)),
                timeout=30,
            ).model_version
            == new
        ),
        timeout=15,
    )
    swap_s = time.monotonic() - announced
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 4
    assert all(versions == {old} for versions in results)  # in-flight streams finished on the old weights
    assert swap_s < 15
    info = handle.backend.model_info()
    assert info["version"] == new and new in info["available_versions"]
    assert wait_for(lambda: len(handle.backend.engine.stats()["cohorts"]) == 1, 10)  # the old model was released


def test_corrupt_and_incompatible_checkpoints_are_rejected(policy, tiny_model_dir):
    settings, handle, stub = policy
    store = CheckpointStore(settings.checkpoint_dir)
    old = handle.version
    corrupt = copy_policy(store, store.path(old))
    weights = store.path(corrupt) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    announce_promoted(settings, corrupt)
    switcher = handle.backend.switcher
    assert wait_for(lambda: corrupt in switcher.rejected)
    assert "sha256 mismatch" in switcher.rejected[corrupt]

    alien = copy_policy(store, store.path(old), change_tokenizer=True)
    announce_promoted(settings, alien)
    assert wait_for(lambda: alien in switcher.rejected)
    assert "tokenizer" in switcher.rejected[alien]

    reply = stub.Generate(
        policy_pb2.GenerateRequest(prompt="Hi", parameters=policy_pb2.GenerationParameters(max_new_tokens=3)),
        timeout=30,
    )
    assert reply.model_version == old == handle.version
    # A good checkpoint is still followed afterwards.
    good = copy_policy(store, store.path(old), kind="ppo")
    promote_checkpoint(settings, good, reason="test")
    assert wait_for(lambda: handle.version == good, 15)


def test_reward_service_follows_reward_promotions_only(tmp_path, broker, tiny_model_dir):
    settings = make_settings(tmp_path, broker, RLHF_TOKENS="usr=u1:user")
    handle = start_reward(settings, port=0)
    try:
        assert handle.switcher.following
        store = CheckpointStore(settings.checkpoint_dir)
        policy_copy = copy_policy(store, tiny_model_dir)
        promote_checkpoint(settings, policy_copy, reason="test")  # another role: ignored
        model = RewardModel.from_causal_lm(tiny_model_dir)
        with store.stage("rm", parents=[policy_copy]) as (folder, manifest):
            model.save_pretrained(folder, tokenizer=load_tokenizer(tiny_model_dir))
        promote_checkpoint(settings, manifest.version, reason="test")
        with with_token(grpc.insecure_channel(f"127.0.0.1:{handle.port}"), "usr") as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            assert wait_for(
                lambda: (
                    stub.Score(reward_pb2.ScoreRequest(prompt="Hi", responses=["a"]), timeout=30).model_version
                    == manifest.version
                ),
                15,
            )
        assert policy_copy not in handle.switcher.rejected
    finally:
        handle.stop()
