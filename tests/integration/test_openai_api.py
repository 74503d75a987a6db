"""The OpenAI-compatible routes, driven by the official `openai` client
(streaming and not, n > 1, logprobs, models), their errors in OpenAI's shape,
and the TGI routes' errors in TGI's shape as TGI's own client sees them
(unknown routes and methods, missing tokens)."""

from __future__ import annotations

import time

import grpc
import httpx
import openai
import pytest
from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from text_generation import Client
from text_generation.errors import NotFoundError, UnknownError, ValidationError

from services.common.auth import bearer, bearer_header, with_token
from services.policy.server import start
from tests.conftest import make_settings

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, broker, tiny_model_dir):
    settings = make_settings(
        tmp_path_factory.mktemp("openai"), broker, RLHF_TOKENS="usr=u1:user:nolog", RLHF_MAX_PROMPT_TOKENS="64"
    )
    handle = start(settings, port=0, http_port=0, follow=False)
    yield handle, f"http://127.0.0.1:{handle.http_port}"
    handle.stop()


def client(url: str, key: str = "usr") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def test_chat_completion_n_samples_usage_logprobs_and_version(server):
    handle, url = server
    api = client(url)
    reply = api.chat.completions.create(
        model="policy", messages=CHAT, n=3, max_tokens=6, temperature=0.9, seed=5, logprobs=True
    )
    assert reply.object == "chat.completion" and reply.model == handle.version
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice in reply.choices:
        assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
        assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
        assert all(t.logprob <= 0 for t in choice.logprobs.content)
    assert reply.usage.prompt_tokens > 0 and 3 <= reply.usage.completion_tokens <= 18
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    again = api.chat.completions.create(model=handle.version, messages=CHAT, n=3, max_tokens=6, temperature=0.9, seed=5)
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]  # seeded

    # The same chat through gRPC, greedy: one submission path, one answer.
    with with_token(grpc.insecure_channel(f"127.0.0.1:{handle.port}"), "usr") as channel:
        grpc_reply = policy_pb2_grpc.PolicyServiceStub(channel).Generate(
            policy_pb2.GenerateRequest(
                messages=[common_pb2.ChatMessage(**m) for m in CHAT],
                parameters=policy_pb2.GenerationParameters(max_new_tokens=6, temperature=0.0),
            ),
            timeout=30,
        )
    greedy = api.chat.completions.create(model="policy", messages=CHAT, max_tokens=6, temperature=0)
    assert greedy.choices[0].message.content == grpc_reply.samples[0].text
    assert greedy.usage.prompt_tokens == grpc_reply.usage.prompt_tokens


def test_chat_stream_matches_the_whole_reply_and_ends_with_usage(server):
    handle, url = server
    api = client(url)
    whole = api.chat.completions.create(model="policy", messages=CHAT, n=2, max_tokens=7, temperature=0)
    texts, finish, roles = ["", ""], [None, None], []
    chunks = list(
        api.chat.completions.create(model="policy", messages=CHAT, n=2, max_tokens=7, temperature=0, stream=True)
    )
    for chunk in chunks:
        assert chunk.object == "chat.completion.chunk" and chunk.model == handle.version
        assert len({c.id for c in chunks}) == 1
        for choice in chunk.choices:
            roles += [choice.delta.role] if choice.delta.role else []
            texts[choice.index] += choice.delta.content or ""
            finish[choice.index] = choice.finish_reason or finish[choice.index]
    assert roles == ["assistant", "assistant"]
    assert texts == [c.message.content for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]
    assert chunks[-1].usage.model_dump() | {"completion_tokens_details": None, "prompt_tokens_details": None} == (
        whole.usage.model_dump()
    )
    # stream_options.include_usage: OpenAI's extra chunk with no choices carries the usage
    chunks = list(
        api.chat.completions.create(
            model="policy",
            messages=CHAT,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_json_and_stream(server):
    handle, url = server
    api = client(url)
    reply = api.completions.create(model="policy", prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=0)
    choice = reply.choices[0]
    assert reply.object == "text_completion" and reply.model == handle.version
    assert "".join(choice.logprobs.tokens) == choice.text and len(choice.logprobs.token_logprobs) == 5
    assert reply.usage.completion_tokens == 5 and choice.finish_reason == "length"
    streamed = list(
        api.completions.create(model="policy", prompt="Once upon a time", max_tokens=5, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    assert streamed[-1].choices[0].finish_reason == "length" and streamed[-1].usage.total_tokens == (
        reply.usage.total_tokens
    )
    two = api.completions.create(model="policy", prompt="Once upon a time", max_tokens=3, n=2, seed=1)
    assert len(two.choices) == 2 and two.usage.completion_tokens == 6


def test_models_name_the_serving_version(server):
    handle, url = server
    api = client(url)
    assert [m.id for m in api.models.list().data] == [handle.version]
    assert api.models.retrieve(handle.version).id == handle.version
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("sft-elsewhere")


@pytest.mark.parametrize(
    ("kwargs", "words", "param"),
    [
        ({"temperature": 5}, ["temperature", "2"], "temperature"),
        ({"n": 1000}, ["n must be between 1 and", "RLHF_MAX_SAMPLES"], "n"),
        ({"max_tokens": 100000}, ["max_tokens", "RLHF_MAX_NEW_TOKENS_LIMIT"], "max_tokens"),
        ({"logprobs": True, "top_logprobs": 3}, ["top_logprobs"], "top_logprobs"),
        ({"presence_penalty": 0.5}, ["presence_penalty", "not supported"], "presence_penalty"),
        ({"messages": [{"role": "robot", "content": "x"}]}, ["messages[0].role"], "messages[0].role"),
    ],
)
def test_validation_errors_are_openai_400s(server, kwargs, words, param):
    _, url = server
    with pytest.raises(openai.BadRequestError) as err:
        client(url).chat.completions.create(**{"model": "policy", "messages": CHAT, **kwargs})
    assert err.value.status_code == 400 and err.value.type == "invalid_request_error" and err.value.param == param
    for word in words:
        assert word in err.value.message
    with pytest.raises(openai.NotFoundError) as err:  # a model this server does not serve
        client(url).chat.completions.create(model="gpt-4o", messages=CHAT)
    assert err.value.code == "model_not_found"


def test_auth_errors_on_every_route(server):
    _, url = server
    with pytest.raises(openai.AuthenticationError) as err:
        client(url, key="not-a-token").chat.completions.create(model="policy", messages=CHAT, max_tokens=2)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(url, key="not-a-token").completions.create(model="policy", prompt="Hi", max_tokens=2, stream=True)
    with pytest.raises(openai.AuthenticationError):
        client(url, key="not-a-token").models.list()
    for method, path in [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("GET", "/v1/models"),
        ("POST", "/generate"),
        ("POST", "/generate_stream"),
        ("POST", "/"),
        ("GET", "/info"),
    ]:
        reply = httpx.request(method, url + path, json={"inputs": "Hi", "model": "policy", "prompt": "Hi"})
        assert reply.status_code == 401, path
        error = reply.json()["error"]
        assert "bearer" in (error["message"] if path.startswith("/v1/") else error), path
    # health and metrics stay open (probes and Prometheus carry no token)
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/metrics").status_code == 200


def test_tgi_client_raises_its_typed_errors(server):
    _, url = server
    with pytest.raises(UnknownError, match="bearer"):  # 401: no TGI error type fits; never a KeyError
        Client(url, timeout=30).generate("Hi", max_new_tokens=2)
    with pytest.raises(UnknownError, match="unknown bearer token"):
        list(Client(url, headers=bearer_header("nope"), timeout=30).generate_stream("Hi", max_new_tokens=2))
    with pytest.raises(NotFoundError, match="Not Found"):  # an unknown route
        Client(url + "/nowhere", headers=bearer_header("usr"), timeout=30).generate("Hi", max_new_tokens=2)
    with pytest.raises(ValidationError, match="max_new_tokens"):
        Client(url, headers=bearer_header("usr"), timeout=30).generate("Hi", max_new_tokens=100000)
    wrong_method = httpx.get(url + "/generate")
    assert wrong_method.status_code == 405 and wrong_method.json()["error_type"] == "method_not_allowed"
    assert httpx.get(url + "/v1/nowhere").json()["error"]["code"] == "not_found"  # OpenAI's shape under /v1


def test_anonymous_generation_is_off_unless_enabled(tmp_path, broker, tiny_model_dir):
    handle = start(
        make_settings(tmp_path, broker, RLHF_ANONYMOUS_GENERATE="true", RLHF_TOKENS="usr=u1:user"),
        port=0,
        http_port=0,
        follow=False,
    )
    try:
        url = f"http://127.0.0.1:{handle.http_port}"
        # OpenAI clients must send some key; "EMPTY" is the custom for open servers
        open_client = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0, timeout=60)
        assert open_client.chat.completions.create(model="policy", messages=CHAT, max_tokens=2).usage.total_tokens
        assert (
            httpx.post(f"{url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}).status_code == 200
        )
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            assert stub.Generate(policy_pb2.GenerateRequest(prompt="Hi"), timeout=30).samples
            assert stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).version == handle.version
            with pytest.raises(grpc.RpcError) as err:  # pinning still needs an admin
                stub.PinVersion(common_pb2.PinVersionRequest(version="base-tiny-seed"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert handle.prompt_log.written == 0 and not handle.prompt_log._buffer  # nobody to attribute them to
            # a known token still identifies its user, whose prompts are logged
            stub.Generate(policy_pb2.GenerateRequest(prompt="Hi"), metadata=bearer("usr"), timeout=30)
        deadline = time.monotonic() + 30
        while handle.prompt_log.written < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert handle.prompt_log.written == 1 and handle.prompt_log.dropped == 0
    finally:
        handle.stop()


def test_lone_surrogates_in_json_are_refused_by_name(server):
    _, url = server
    headers = {**bearer_header("usr"), "content-type": "application/json"}
    tgi = httpx.post(f"{url}/generate", content='{"inputs": "a\\ud800b"}', headers=headers, timeout=30)
    assert tgi.status_code == 422 and tgi.json()["error_type"] == "validation" and "`inputs`" in tgi.json()["error"]
    body = '{"model": "policy", "messages": [{"role": "user", "content": "\\udfff"}]}'
    chat = httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers, timeout=30)
    assert chat.status_code == 400 and "`messages[0].content`" in chat.json()["error"]["message"]
