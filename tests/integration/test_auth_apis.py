"""Authentication on every gRPC API of the policy and reward services: a
missing or unknown token is UNAUTHENTICATED, a role without the right is
PERMISSION_DENIED, a good token works. (The HTTP APIs: test_openai_api.py.)"""

from __future__ import annotations

import grpc
import pytest
from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc, reward_pb2, reward_pb2_grpc

from services.common.auth import bearer
from services.policy.server import start as start_policy
from services.reward.server import start as start_reward
from tests.conftest import make_settings


@pytest.fixture(scope="module")
def stubs(tmp_path_factory, broker, tiny_model_dir):
    settings = make_settings(
        tmp_path_factory.mktemp("auth"),
        broker,
        RLHF_TOKENS="usr=u1:user:nolog,lab=l1:labeler,adm=root:admin",
    )
    policy = start_policy(settings, port=0, http_port=None, follow=False)
    reward = start_reward(settings, port=0, follow=False)
    channels = [grpc.insecure_channel(f"127.0.0.1:{h.port}") for h in (policy, reward)]
    yield policy_pb2_grpc.PolicyServiceStub(channels[0]), reward_pb2_grpc.RewardServiceStub(channels[1])
    for channel in channels:
        channel.close()
    reward.stop()
    policy.stop()


GENERATE = policy_pb2.GenerateRequest(prompt="Hi", parameters=policy_pb2.GenerationParameters(max_new_tokens=1))
SCORE = reward_pb2.ScoreRequest(prompt="Hi", responses=["Hello"])


def calls(stubs):
    policy, reward = stubs
    return {
        "Generate": lambda md: policy.Generate(GENERATE, metadata=md, timeout=30),
        "GenerateStream": lambda md: list(policy.GenerateStream(GENERATE, metadata=md, timeout=30)),
        "Policy.GetModelInfo": lambda md: policy.GetModelInfo(
            common_pb2.GetModelInfoRequest(), metadata=md, timeout=10
        ),
        "Score": lambda md: reward.Score(SCORE, metadata=md, timeout=30),
        "Reward.GetModelInfo": lambda md: reward.GetModelInfo(
            common_pb2.GetModelInfoRequest(), metadata=md, timeout=10
        ),
    }


@pytest.mark.parametrize(
    "method", ["Generate", "GenerateStream", "Policy.GetModelInfo", "Score", "Reward.GetModelInfo"]
)
def test_every_call_needs_a_known_token(stubs, method):
    call = calls(stubs)[method]
    for metadata in ((), bearer("not-a-token"), [("authorization", "Basic dXNyOg==")]):
        with pytest.raises(grpc.RpcError) as err:
            call(metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method, metadata)
    for token in ("usr", "lab", "adm"):  # every role may generate, score and read model info
        assert call(bearer(token))


@pytest.mark.parametrize("service", ["policy", "reward"])
def test_pinning_needs_the_admin_role(stubs, service):
    stub = stubs[0] if service == "policy" else stubs[1]
    version = "base-tiny-seed" if service == "policy" else "rm-tiny-seed"
    for token in ("usr", "lab"):
        with pytest.raises(grpc.RpcError) as err:
            stub.PinVersion(common_pb2.PinVersionRequest(version=version), metadata=bearer(token), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "admin" in err.value.details()
    assert stub.PinVersion(common_pb2.PinVersionRequest(version=""), metadata=bearer("adm"), timeout=30).version
