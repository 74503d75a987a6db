"""The PolicyService over real gRPC (tiny model, real broker): generation,
streaming, K samples, validation errors naming the field, overload, cancel,
and admin-only pinning."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch
from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc

from services.common.auth import bearer, with_token
from services.common.models import load_causal_lm, load_tokenizer, render_prompt
from services.policy.server import start
from tests.conftest import make_settings

ADMIN = "adm-token"


@pytest.fixture(scope="module")
def policy(tmp_path_factory, broker, tiny_model_dir):
    settings = make_settings(
        tmp_path_factory.mktemp("policy"),
        broker,
        RLHF_MAX_PROMPT_TOKENS="64",
        RLHF_MAX_NEW_TOKENS_LIMIT="512",
        RLHF_KV_BUDGET_TOKENS="8192",
        RLHF_TOKENS=f"{ADMIN}=root:admin,usr=u1:user",
    )
    handle = start(settings, port=0, http_port=None)
    channel = with_token(grpc.insecure_channel(f"127.0.0.1:{handle.port}"), "usr")
    yield handle, policy_pb2_grpc.PolicyServiceStub(channel)
    channel.close()
    handle.stop()


def gen(prompt="Hello there", **params):
    return policy_pb2.GenerateRequest(prompt=prompt, parameters=policy_pb2.GenerationParameters(**params))


def test_generate_k_samples_names_version_and_usage(policy):
    handle, stub = policy
    reply = stub.Generate(
        gen(max_new_tokens=8, num_samples=4, seed=11, temperature=0.8, return_logprobs=True), timeout=30
    )
    assert reply.model_version == handle.version == "base-tiny-seed"
    assert len(reply.samples) == 4
    assert [s.seed for s in reply.samples] == [11, 12, 13, 14]
    for s in reply.samples:
        assert s.finish_reason in (policy_pb2.FINISH_REASON_LENGTH, policy_pb2.FINISH_REASON_EOS)
        assert len(s.tokens) == s.generated_tokens <= 8
    assert reply.usage.completion_tokens == sum(s.generated_tokens for s in reply.samples)
    assert reply.usage.prompt_tokens > 0
    # Same seed, same samples: K samples are reproducible one by one.
    again = stub.Generate(gen(max_new_tokens=8, num_samples=4, seed=11, temperature=0.8), timeout=30)
    assert [s.text for s in again.samples] == [s.text for s in reply.samples]


def test_chat_messages_and_streaming(policy):
    _, stub = policy
    request = policy_pb2.GenerateRequest(
        messages=[
            common_pb2.ChatMessage(role="system", content="Be brief."),
            common_pb2.ChatMessage(role="user", content="Hi"),
        ],
        parameters=policy_pb2.GenerationParameters(max_new_tokens=6, temperature=0.0, num_samples=2),
    )
    unary = stub.Generate(request, timeout=30)
    pieces = {0: [], 1: []}
    finals = {}
    for message in stub.GenerateStream(request, timeout=30):
        assert message.model_version == "base-tiny-seed"
        if not message.token.special:
            pieces[message.sample_index].append(message.token.text)
        if message.finish_reason:
            finals[message.sample_index] = message
    for i in (0, 1):
        assert "".join(pieces[i]) == finals[i].generated_text == unary.samples[i].text
        assert finals[i].usage.completion_tokens == unary.samples[i].generated_tokens


@pytest.mark.parametrize(
    "request_, words",
    [
        (gen(prompt="   "), ["prompt", "empty"]),
        (gen(num_samples=0), ["num_samples", "between 1 and 16"]),
        (gen(num_samples=17), ["num_samples", "between 1 and 16", "RLHF_MAX_SAMPLES"]),
        (gen(temperature=-1.0), ["temperature", ">= 0"]),
        (gen(top_p=0.0), ["top_p", "(0, 1]"]),
        (gen(top_p=1.5), ["top_p", "(0, 1]"]),
        (gen(prompt="word " * 200), ["prompt has", "limit is 64", "RLHF_MAX_PROMPT_TOKENS"]),
        (gen(max_new_tokens=513), ["max_new_tokens", "512"]),
        (
            policy_pb2.GenerateRequest(messages=[common_pb2.ChatMessage(role="robot", content="x")]),
            ["messages[0].role"],
        ),
    ],
)
def test_invalid_arguments_name_the_field_and_limit(policy, request_, words):
    _, stub = policy
    for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as err:
            call(request_, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for word in words:
            assert word in err.value.details()


def test_cancelled_stream_frees_its_slot(policy):
    handle, stub = policy
    stream = stub.GenerateStream(gen(max_new_tokens=500, temperature=0.0), timeout=60)
    next(stream)
    deadline = time.monotonic() + 5
    while handle.backend.engine.stats()["running"] != 1 and time.monotonic() < deadline:
        time.sleep(0.01)  # the first token is sent during prefill, just before the row joins the batch
    assert handle.backend.engine.stats()["running"] == 1
    stream.cancel()
    while handle.backend.engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handle.backend.engine.stats()["running"] == 0


def test_deadline_is_honoured(policy):
    handle, stub = policy
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(gen(max_new_tokens=512, temperature=0.0), timeout=0.15)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 5
    while handle.backend.engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handle.backend.engine.stats()["running"] == 0


def test_pin_needs_admin_and_unknown_version_is_invalid(policy):
    handle, stub = policy
    with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as anonymous, pytest.raises(grpc.RpcError) as err:
        policy_pb2_grpc.PolicyServiceStub(anonymous).PinVersion(
            common_pb2.PinVersionRequest(version="base-tiny-seed"), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        stub.PinVersion(common_pb2.PinVersionRequest(version="base-tiny-seed"), metadata=bearer("usr"), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        stub.PinVersion(common_pb2.PinVersionRequest(version="sft-nope"), metadata=bearer(ADMIN), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "version" in err.value.details() and "sft-nope" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # a reward checkpoint cannot serve as a policy
        stub.PinVersion(common_pb2.PinVersionRequest(version="rm-tiny-seed"), metadata=bearer(ADMIN), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "reward checkpoint" in err.value.details()
    info = stub.PinVersion(common_pb2.PinVersionRequest(version="base-tiny-seed"), metadata=bearer(ADMIN), timeout=30)
    assert (
        info.pinned_version == "base-tiny-seed" and info.backend == "local" and '"kind": "base"' in info.manifest_json
    )
    info = stub.PinVersion(common_pb2.PinVersionRequest(version=""), metadata=bearer(ADMIN), timeout=30)
    assert info.pinned_version == "" and info.version == "base-tiny-seed"
    assert "base-tiny-seed" in stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).available_versions


def test_full_queue_is_resource_exhausted(tmp_path, broker, tiny_model_dir):
    settings = make_settings(tmp_path, broker, RLHF_MAX_BATCH="1", RLHF_MAX_QUEUE="1", RLHF_TOKENS="usr=u1:user")
    handle = start(settings, port=0, http_port=None, follow=False)
    try:
        with with_token(grpc.insecure_channel(f"127.0.0.1:{handle.port}"), "usr") as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            running = stub.GenerateStream(gen(max_new_tokens=500, temperature=0.0), timeout=60)
            next(running)  # occupies the only batch slot
            queued = stub.GenerateStream(gen(max_new_tokens=5, temperature=0.0), timeout=60)
            deadline = time.monotonic() + 5
            while handle.backend.engine.stats()["queued"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(gen(max_new_tokens=5), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "RLHF_MAX_QUEUE" in err.value.details()
            running.cancel()
            assert list(queued)[-1].finish_reason  # the queued one still completes
    finally:
        handle.stop()


def test_prompt_logprobs_score_the_rendered_prompt(policy, tiny_model_dir):
    handle, stub = policy
    reply = stub.Generate(gen(max_new_tokens=2, num_samples=2, return_prompt_logprobs=True), timeout=30)
    tokens = reply.prompt_tokens
    assert len(tokens) == reply.usage.prompt_tokens and len(reply.samples) == 2
    # a plain forward pass over the same (chat-templated) prompt gives the same scores
    tokenizer, model = load_tokenizer(tiny_model_dir), load_causal_lm(tiny_model_dir)
    ids = tokenizer(render_prompt(tokenizer, "Hello there"), add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    assert [t.id for t in tokens] == ids and tokens[0].logprob == 0.0
    assert [t.logprob for t in tokens[1:]] == pytest.approx(
        [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))], abs=1e-4
    )
    assert not stub.Generate(gen(max_new_tokens=2), timeout=30).prompt_tokens  # only when asked

    with pytest.raises(grpc.RpcError) as err:
        list(stub.GenerateStream(gen(max_new_tokens=2, return_prompt_logprobs=True), timeout=30))
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "parameters.return_prompt_logprobs" in err.value.details()
    )


def test_unsampleable_parameters_are_refused_beside_an_in_flight_stream(policy):
    """temperature=1e-45 or repetition_penalty=1e-45 once turned sampling into NaN and failed
    every row of the batch; now they are refused up front, and the stream beside them is untouched."""
    _, stub = policy
    alone = list(stub.GenerateStream(gen(max_new_tokens=24, temperature=0.0), metadata=bearer("usr"), timeout=60))
    stream = stub.GenerateStream(gen(max_new_tokens=24, temperature=0.0), metadata=bearer("usr"), timeout=60)
    got = [next(stream)]
    for field, bad in (
        ("temperature", {"temperature": 1e-45}),
        ("repetition_penalty", {"temperature": 0.7, "repetition_penalty": 1e-45}),
        ("repetition_penalty", {"temperature": 0.7, "num_samples": 4, "repetition_penalty": 1e-45}),
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(gen(max_new_tokens=8, **bad), metadata=bearer("usr"), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"{field} must be" in err.value.details()
    got += list(stream)
    assert got[-1].generated_text == alone[-1].generated_text
    assert [m.token.id for m in got] == [m.token.id for m in alone]


def test_shutdown_drains_streams_in_progress_and_refuses_new_calls(tmp_path, broker, tiny_model_dir):
    """Stopping with a grace period: a stream in progress runs to its last token,
    while a call that arrives meanwhile gets UNAVAILABLE (which clients retry)."""
    settings = make_settings(tmp_path, broker, RLHF_TOKENS="usr=u1:user", RLHF_MAX_NEW_TOKENS_LIMIT="512")
    handle = start(settings, port=0, http_port=None)
    stopper = None
    try:
        with with_token(grpc.insecure_channel(f"127.0.0.1:{handle.port}"), "usr") as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            stream = stub.GenerateStream(gen(max_new_tokens=300, temperature=0.0), timeout=60)
            first = next(stream)
            stopper = threading.Thread(target=handle.stop, kwargs={"grace": 30})
            stopper.start()
            refused = None
            deadline = time.monotonic() + 10
            while refused is None and time.monotonic() < deadline:
                try:
                    stub.Generate(gen(max_new_tokens=1), timeout=5)
                    time.sleep(0.02)  # the drain may not have begun yet
                except grpc.RpcError as err:
                    refused = err
            assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE, refused
            assert "shutting down" in refused.details()
            rest = list(stream)
        assert rest[-1].finish_reason != policy_pb2.FINISH_REASON_UNSPECIFIED
        assert 1 + len(rest) == rest[-1].usage.completion_tokens and first.token.text is not None
    finally:
        if stopper is not None:
            stopper.join(60)
        else:
            handle.stop()
