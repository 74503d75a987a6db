"""The RewardService over real gRPC: one scalar per response, equal to the
model's value at the response's EOS, the same alone or in any batch, and
validation errors that name the field."""

from __future__ import annotations

import grpc
import pytest
from rlhf.v1 import common_pb2, reward_pb2, reward_pb2_grpc

from services.common.auth import bearer, with_token
from services.common.checkpoints import CheckpointStore
from services.common.models import RewardModel, encode_prompt_response, load_tokenizer, render_prompt
from services.reward.server import score_sequences, start
from tests.conftest import make_settings

RESPONSES = ["Blue.", "It is blue because of Rayleigh scattering of sunlight.", "", "I do not know."]


@pytest.fixture(scope="module")
def reward(tmp_path_factory, broker, tiny_model_dir):
    settings = make_settings(
        tmp_path_factory.mktemp("reward"), broker, RLHF_REWARD_BATCH="3", RLHF_TOKENS="adm=root:admin,usr=u1:user"
    )
    handle = start(settings, port=0, follow=False)
    channel = with_token(grpc.insecure_channel(f"127.0.0.1:{handle.port}"), "usr")
    yield settings, handle, reward_pb2_grpc.RewardServiceStub(channel)
    channel.close()
    handle.stop()


def test_scores_match_the_model_at_the_last_real_token(reward):
    settings, handle, stub = reward
    reply = stub.Score(reward_pb2.ScoreRequest(prompt="Why is the sky blue?", responses=RESPONSES), timeout=30)
    assert reply.model_version == handle.version == "rm-tiny-seed"
    assert len(reply.scores) == len(RESPONSES)
    store = CheckpointStore(settings.checkpoint_dir)
    path = store.path(reply.model_version)
    model, tok = RewardModel.from_pretrained(path), load_tokenizer(path)
    prompt = render_prompt(tok, "Why is the sky blue?")
    for response, score in zip(RESPONSES, reply.scores, strict=True):
        seq = encode_prompt_response(tok, prompt, response, 1024)
        assert score == pytest.approx(score_sequences(model, [seq], tok.pad_token_id)[0], abs=1e-4)
    # Alone, or in another request's company, a response scores the same.
    for i, response in enumerate(RESPONSES):
        alone = stub.Score(reward_pb2.ScoreRequest(prompt="Why is the sky blue?", responses=[response]), timeout=30)
        assert alone.scores[0] == pytest.approx(reply.scores[i], abs=1e-4)


def test_chat_messages_are_rendered_like_a_prompt(reward):
    _, _, stub = reward
    as_prompt = stub.Score(reward_pb2.ScoreRequest(prompt="Hello", responses=["Hi!"]), timeout=30)
    as_chat = stub.Score(
        reward_pb2.ScoreRequest(messages=[common_pb2.ChatMessage(role="user", content="Hello")], responses=["Hi!"]),
        timeout=30,
    )
    assert as_chat.scores[0] == pytest.approx(as_prompt.scores[0], abs=1e-5)


@pytest.mark.parametrize(
    "request_, words",
    [
        (reward_pb2.ScoreRequest(prompt="Hi", responses=[]), ["responses", "empty"]),
        (reward_pb2.ScoreRequest(prompt=" ", responses=["a"]), ["prompt", "empty"]),
        (
            reward_pb2.ScoreRequest(prompt="Hi", responses=["a"] * 65),
            ["responses", "limit is 64", "RLHF_REWARD_MAX_RESPONSES"],
        ),
        (
            reward_pb2.ScoreRequest(messages=[common_pb2.ChatMessage(role="bot", content="x")], responses=["a"]),
            ["messages[0].role"],
        ),
    ],
)
def test_invalid_requests_name_the_field(reward, request_, words):
    _, _, stub = reward
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(request_, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for word in words:
        assert word in err.value.details()


def test_model_info_and_pin(reward):
    _, handle, stub = reward
    info = stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10)
    assert info.version == "rm-tiny-seed" and info.kind == "rm" and '"untrained": true' in info.manifest_json
    with pytest.raises(grpc.RpcError) as err:
        stub.PinVersion(common_pb2.PinVersionRequest(version="base-tiny-seed"), metadata=bearer("adm"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "policy checkpoint" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.PinVersion(common_pb2.PinVersionRequest(version="rm-unknown"), metadata=bearer("adm"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rm-unknown" in err.value.details()
