"""API prompts become training data, through the real broker and the real
dataset builder: every prompt served over gRPC, the OpenAI routes or the TGI
routes is logged under its token's user with its source and serving version,
the opt-outs hold, and the snapshot applies the data rules (cap per user,
prefix de-duplication, user-disjoint splits, PII scrubbed in train). A broker
outage never stalls or fails generation; the log drops what its bounded
buffer cannot hold, counts it, and delivers the rest once the broker is back."""

from __future__ import annotations

import logging
import time

import grpc
import httpx
import openai
import pytest
from prometheus_client import REGISTRY
from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc

from services.common import bus
from services.common.auth import bearer, bearer_header
from services.common.broker import free_port, start_broker, stop_process
from services.common.datasets import KINDS, SPLITS, SnapshotStore
from services.datasets.builder import build_snapshot
from services.datasets.rules import RuleParams, split_of
from services.policy.prompt_log import LOG_HEADER
from services.policy.server import start
from tests.conftest import make_settings

LONG = (
    "Please write a thorough, well structured report about the economic history of the Hanseatic League and its trade"
)


def wait_until(check, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def generate(stub, prompt: str, token: str, *extra):
    return stub.Generate(
        policy_pb2.GenerateRequest(prompt=prompt, parameters=policy_pb2.GenerationParameters(max_new_tokens=1)),
        metadata=[*bearer(token), *extra],
        timeout=60,
    )


def test_api_prompts_reach_the_snapshot_under_the_data_rules(tmp_path, broker, tiny_model_dir):
    params = RuleParams(max_prompts_per_user=3)
    # One user whose split is train (PII scrubbed there) and one whose split is not.
    candidates = [f"app-user-{i}" for i in range(200)]
    trained = next(u for u in candidates if split_of(u, params) == "train")
    held_out = next(u for u in candidates if split_of(u, params) != "train")
    settings = make_settings(
        tmp_path,
        broker,
        RLHF_TOKENS=f"ta={trained}:user,tb={held_out}:user,tc=quiet:user:nolog,tl=lab1:labeler",
        RLHF_DATASET_MAX_PROMPTS_PER_USER="3",
    )
    handle = start(settings, port=0, http_port=0, follow=False)
    url = f"http://127.0.0.1:{handle.http_port}"
    try:
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            generate(stub, f"{LONG}, please. Reach me at ada@example.com", "ta")  # 1
            generate(stub, f"{LONG} and the Baltic trade routes", "ta")  # 2: same long prefix as 1
            generate(stub, "Why is the sky blue?", "ta")  # 3
            generate(stub, "Write a haiku about rain.", "ta")  # 4
            generate(stub, "Name three rivers.", "ta")  # 5: over the cap of 3
            generate(stub, "Opted out by header.", "ta", (LOG_HEADER, "false"))
            generate(stub, "Opted out by token.", "tc")
            generate(stub, "A labeler sampling outputs to rank.", "tl")
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="tb", max_retries=0, timeout=60)
        api.chat.completions.create(
            model="policy",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Mail bob@example.org a summary."},
            ],
            max_tokens=1,
            user="mallory",  # a payload field never attributes a prompt
        )
        api.completions.create(
            model="policy", prompt="Kept out with store=false.", max_tokens=1, extra_body={"store": False}
        )
        reply = httpx.post(
            f"{url}/generate",
            json={"inputs": "Tell me a joke.", "parameters": {"max_new_tokens": 1}},
            headers=bearer_header("tb"),
            timeout=60,
        )
        assert reply.status_code == 200
        assert wait_until(lambda: handle.prompt_log.written == 7), handle.prompt_log.written
        assert handle.prompt_log.dropped == 0
    finally:
        handle.stop()

    events = bus.read_topic(settings, "prompts")
    assert sorted((e.user_id, e.source) for e in events) == sorted(
        [(trained, "api")] * 5 + [(held_out, "openai"), (held_out, "tgi")]
    )
    assert {e.metadata["model_version"] for e in events} == {handle.version}
    chat = next(e for e in events if e.source == "openai")
    assert chat.text == "Mail bob@example.org a summary." and [m.role for m in chat.messages] == ["system", "user"]

    snapshot = build_snapshot(settings, group_id="g-api", timeout=60)
    store = SnapshotStore(settings.dataset_dir)
    rows = {split: store.read(snapshot, split, "prompts") for split in SPLITS}
    assert {r["user_id"] for r in rows["train"]} == {trained}
    held = [r for split in SPLITS if split != "train" for r in rows[split]]
    assert {r["user_id"] for r in held} == {held_out}  # user-disjoint splits
    texts = sorted(r["text"] for r in rows["train"])
    assert texts == sorted(
        [f"{LONG}, please. Reach me at [EMAIL]", "Why is the sky blue?", "Write a haiku about rain."]
    )
    assert sorted((r["source"], r["text"]) for r in held) == [
        ("openai", "Mail bob@example.org a summary."),  # held-out splits stay verbatim
        ("tgi", "Tell me a joke."),
    ]
    assert all(not store.read(snapshot, split, kind) for split in SPLITS for kind in KINDS if kind != "prompts")


def dropped_total() -> float:
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "rlhf_prompt_log_dropped"
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


def test_a_broker_outage_never_stalls_generation(tmp_path, tiny_model_dir, caplog):
    port = free_port()
    broker = start_broker(port, log_path=tmp_path / "tansu.log")
    settings = make_settings(
        tmp_path / "home",
        f"127.0.0.1:{port}",
        RLHF_TOKENS="usr=u1:user",
        RLHF_KAFKA_TIMEOUT_S="1",
        RLHF_PROMPT_LOG_BUFFER="2",
    )
    handle = start(settings, port=0, http_port=0, follow=False)
    dropped_before = dropped_total()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            generate(stub, "Before the outage.", "usr")
            assert wait_until(lambda: handle.prompt_log.written == 1)

            # The broker goes away in the middle of a stream: the stream finishes normally.
            stream = stub.GenerateStream(
                policy_pb2.GenerateRequest(
                    prompt="During the outage.",
                    parameters=policy_pb2.GenerationParameters(max_new_tokens=200, temperature=0.0),
                ),
                metadata=bearer("usr"),
                timeout=120,
            )
            next(stream)
            assert wait_until(lambda: handle.prompt_log.written == 2)  # its prompt was logged before the outage
            stop_process(broker)
            broker = None
            assert list(stream)[-1].finish_reason == policy_pb2.FINISH_REASON_LENGTH

            with caplog.at_level(logging.WARNING, logger="services.policy.prompt_log"):
                for i in range(4):
                    assert generate(stub, f"Outage prompt {i}.", "usr").samples
                api = openai.OpenAI(base_url=f"http://127.0.0.1:{handle.http_port}/v1", api_key="usr", max_retries=0)
                assert api.chat.completions.create(
                    model="policy", messages=[{"role": "user", "content": "Outage chat."}], max_tokens=2
                ).choices
                assert stub.GetModelInfo(common_pb2.GetModelInfoRequest(), metadata=bearer("usr"), timeout=10).version
            # 5 prompts while the broker was away; the buffer holds 2, and a batch in flight (at most one
            # buffer's worth) waits outside it: at least 1 is dropped, counted in the metric, and reported.
            lost = handle.prompt_log.dropped
            assert 1 <= lost <= 4 and handle.prompt_log.written == 2
            assert dropped_total() - dropped_before == lost
            assert any("dropped" in r.getMessage() for r in caplog.records)

            broker = start_broker(port, log_path=tmp_path / "tansu-2.log")
            assert wait_until(lambda: handle.prompt_log.written == 7 - lost, timeout=90), handle.prompt_log.written
        # what waited in the buffer reached the restarted broker
        texts = [e.text for e in bus.read_topic(settings, "prompts")]
        assert len([t for t in texts if t.startswith("Outage")]) == 5 - lost
    finally:
        handle.stop()
        if broker is not None:
            stop_process(broker)


def test_a_bad_opt_out_header_is_invalid(tmp_path, broker, tiny_model_dir):
    value = "maybe"
    handle = start(make_settings(tmp_path, broker, RLHF_TOKENS="usr=u1:user"), port=0, http_port=0, follow=False)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel, pytest.raises(grpc.RpcError) as err:
            generate(policy_pb2_grpc.PolicyServiceStub(channel), "Hi", "usr", (LOG_HEADER, value))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and LOG_HEADER in err.value.details()
        reply = httpx.post(
            f"http://127.0.0.1:{handle.http_port}/generate",
            json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}},
            headers={**bearer_header("usr"), LOG_HEADER: value},
        )
        assert reply.status_code == 422 and LOG_HEADER in reply.json()["error"]
    finally:
        handle.stop()
