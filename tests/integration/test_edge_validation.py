"""Validation at every gRPC edge: version names are checked against the
store's naming rule before any filesystem call (and errors never show a
server path), and request bytes that do not decode get INVALID_ARGUMENT on
every service, never INTERNAL."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2
from rlhf.v1 import common_pb2, policy_pb2_grpc, reward_pb2_grpc

from services.common.auth import bearer
from services.feedback.server import start as start_feedback
from services.policy.server import start as start_policy
from services.reward.server import start as start_reward
from tests.conftest import make_settings

TOKENS = "adm=root:admin,usr=u1:user"
# GenerateRequest / ScoreRequest field 1 (prompt) holding a lone surrogate, UTF-8 encoded (not valid UTF-8)
LONE_SURROGATE = b"\x0a\x03\xed\xa0\x80"
GARBAGE = b"\xff\xff\xff\xff"


@pytest.fixture(scope="module")
def servers(tmp_path_factory, broker, tiny_model_dir):
    settings = make_settings(tmp_path_factory.mktemp("edges"), broker, RLHF_TOKENS=TOKENS, RLHF_PROMPT_LOG="false")
    policy = start_policy(settings, port=0, http_port=None, follow=False)
    reward = start_reward(settings, port=0, follow=False)
    feedback = start_feedback(settings)
    yield settings, {"policy": policy.port, "reward": reward.port, "feedback": feedback.port}
    for handle in (feedback, reward, policy):
        handle.stop()


@pytest.mark.parametrize("service", ["policy", "reward"])
@pytest.mark.parametrize(
    ("version", "words"),
    [
        ("v" * 300, ["300 characters", "limit is 128"]),
        ("../../etc/passwd", ["not a checkpoint name"]),
        ("sft-\x00nul", ["not a checkpoint name"]),
        ("sft-unknown-version", ["unknown checkpoint version"]),
    ],
)
def test_pin_version_checks_the_name_first_and_hides_paths(servers, service, version, words):
    settings, ports = servers
    with grpc.insecure_channel(f"127.0.0.1:{ports[service]}") as channel:
        stub = (policy_pb2_grpc.PolicyServiceStub if service == "policy" else reward_pb2_grpc.RewardServiceStub)(
            channel
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.PinVersion(common_pb2.PinVersionRequest(version=version), metadata=bearer("adm"), timeout=10)
    assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    for word in words:
        assert word in err.value.details()
    assert str(settings.checkpoint_dir) not in err.value.details() and str(settings.home) not in err.value.details()


def raw_call(port: int, method: str, payload: bytes, stream: bool = False):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        if stream:
            call = channel.unary_stream(method)(payload, metadata=bearer("usr"), timeout=10)
            return list(call)
        return channel.unary_unary(method)(payload, metadata=bearer("usr"), timeout=10)


METHODS = [
    ("policy", "/rlhf.v1.PolicyService/Generate", False),
    ("policy", "/rlhf.v1.PolicyService/GenerateStream", True),
    ("policy", "/rlhf.v1.PolicyService/PinVersion", False),
    ("reward", "/rlhf.v1.RewardService/Score", False),
    ("reward", "/rlhf.v1.RewardService/PinVersion", False),
    ("policy", "/grpc.health.v1.Health/Check", False),
    ("feedback", "/grpc.health.v1.Health/Check", False),  # the grpc.aio server
    ("feedback", "/rlhf.v1.FeedbackService/LogPrompt", False),
]
# Every method's field 1 is a string, so the lone surrogate breaks each of them; GetModelInfoRequest has
# no fields (unknown fields are valid protobuf), so only garbage breaks it.
CASES = [(*m, LONE_SURROGATE) for m in METHODS] + [(*m, GARBAGE) for m in METHODS]
CASES.append(("policy", "/rlhf.v1.PolicyService/GetModelInfo", False, GARBAGE))
CASES.append(("reward", "/rlhf.v1.RewardService/GetModelInfo", False, GARBAGE))


@pytest.mark.parametrize(("service", "method", "stream", "payload"), CASES)
def test_undecodable_requests_are_invalid_argument(servers, service, method, stream, payload):
    _, ports = servers
    with pytest.raises(grpc.RpcError) as err:
        raw_call(ports[service], method, payload, stream)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "not valid UTF-8" in err.value.details() or "not a valid" in err.value.details()


def test_a_good_request_still_works_beside_the_guard(servers):
    _, ports = servers
    reply = raw_call(
        ports["policy"], "/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest().SerializeToString()
    )
    assert health_pb2.HealthCheckResponse.FromString(reply).status == health_pb2.HealthCheckResponse.SERVING
