"""The TGI-compatible HTTP API, driven by the unmodified `text_generation`
client (sync and async), and the TGI backend: a second policy server that
generates through the first one's HTTP API."""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import pytest
import torch
from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from text_generation import AsyncClient, Client
from text_generation.errors import OverloadedError, ValidationError

from services.common.auth import bearer_header, with_token
from services.common.errors import Status
from services.common.models import load_causal_lm, load_tokenizer
from services.policy.request import Failed, Finished
from services.policy.server import start
from tests.conftest import make_settings

TOKENS = "usr=u1:user"
AUTH = bearer_header("usr")


@pytest.fixture(scope="module")
def server(tmp_path_factory, broker, tiny_model_dir):
    settings = make_settings(tmp_path_factory.mktemp("tgi"), broker, RLHF_MAX_PROMPT_TOKENS="64", RLHF_TOKENS=TOKENS)
    handle = start(settings, port=0, http_port=0, follow=False)
    yield handle, f"http://127.0.0.1:{handle.http_port}"
    handle.stop()


def test_client_generate_and_details(server):
    handle, url = server
    reply = Client(url, headers=AUTH, timeout=30).generate(
        "Once upon a time", max_new_tokens=7, decoder_input_details=False
    )
    assert reply.details.finish_reason.value in ("length", "eos_token")
    assert reply.details.generated_tokens == len(reply.details.tokens) <= 7
    assert reply.generated_text == "".join(t.text for t in reply.details.tokens if not t.special)
    assert all(t.logprob <= 0 for t in reply.details.tokens)
    assert reply.details.seed is None  # greedy
    sampled = Client(url, headers=AUTH, timeout=30).generate(
        "Once upon a time", max_new_tokens=5, do_sample=True, seed=42, top_p=0.9
    )
    assert sampled.details.seed == 42
    again = Client(url, headers=AUTH, timeout=30).generate(
        "Once upon a time", max_new_tokens=5, do_sample=True, seed=42, top_p=0.9
    )
    assert again.generated_text == sampled.generated_text
    full = Client(url, headers=AUTH, timeout=30).generate("Once upon a time", max_new_tokens=5, return_full_text=True)
    assert full.generated_text == "Once upon a time" + reply.generated_text[: len(full.generated_text) - 16]
    best = Client(url, headers=AUTH, timeout=30).generate(
        "Once upon a time", max_new_tokens=4, best_of=3, do_sample=True
    )
    assert len(best.details.best_of_sequences) == 2


def test_decoder_input_details_scores_the_prompt(server, tiny_model_dir, tmp_path, broker):
    _, url = server
    prompt = "Once upon a time there was"
    reply = Client(url, headers=AUTH, timeout=30).generate(prompt, max_new_tokens=3, decoder_input_details=True)
    prefill = reply.details.prefill
    # the same numbers from a plain forward pass of the served weights
    tokenizer, model = load_tokenizer(tiny_model_dir), load_causal_lm(tiny_model_dir)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    assert [t.id for t in prefill] == ids and prefill[0].logprob is None
    assert [t.logprob for t in prefill[1:]] == pytest.approx(
        [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))], abs=1e-4
    )
    assert "".join(t.text for t in prefill) == prompt
    assert (
        Client(url, headers=AUTH, timeout=30).generate(prompt, max_new_tokens=3).details.prefill == []
    )  # only when asked
    refused = httpx.post(
        f"{url}/generate_stream",
        json={"inputs": prompt, "parameters": {"decoder_input_details": True, "details": True}},
        headers=AUTH,
        timeout=30,
    )
    assert (
        refused.status_code == 422
        and "`decoder_input_details` == true is not supported when streaming" in refused.json()["error"]
    )

    # through a second policy server whose backend is TGI (the first server)
    proxy = start(
        make_settings(tmp_path, broker, RLHF_TGI_URL=url, RLHF_TGI_TOKEN="usr", RLHF_TOKENS=TOKENS), port=0, http_port=0
    )
    try:
        via = Client(f"http://127.0.0.1:{proxy.http_port}", headers=AUTH, timeout=30).generate(
            prompt, max_new_tokens=3, decoder_input_details=True
        )
        assert [(t.id, t.text) for t in via.details.prefill] == [(t.id, t.text) for t in prefill]
        assert [t.logprob for t in via.details.prefill[1:]] == pytest.approx([t.logprob for t in prefill[1:]], abs=1e-5)
    finally:
        proxy.stop()


def test_client_stream_matches_generate(server):
    _, url = server
    client = Client(url, headers=AUTH, timeout=30)
    whole = client.generate("Tell me", max_new_tokens=9)
    events = list(client.generate_stream("Tell me", max_new_tokens=9))
    assert [e.token.id for e in events] == [t.id for t in whole.details.tokens]
    assert all(e.details is None for e in events[:-1])
    assert events[-1].generated_text == whole.generated_text
    assert events[-1].details.finish_reason == whole.details.finish_reason
    assert events[-1].details.generated_tokens == whole.details.generated_tokens


def test_async_client_generate_and_stream(server):
    _, url = server

    async def run():
        client = AsyncClient(url, headers=AUTH, timeout=30)
        reply = await client.generate("Hi", max_new_tokens=5)
        tokens = [r async for r in client.generate_stream("Hi", max_new_tokens=5)]
        return reply, tokens

    reply, tokens = asyncio.run(run())
    assert tokens[-1].generated_text == reply.generated_text


def test_validation_errors_are_tgi_422(server):
    handle, url = server
    with pytest.raises(ValidationError, match="RLHF_MAX_PROMPT_TOKENS"):
        Client(url, headers=AUTH, timeout=30).generate("word " * 200, max_new_tokens=5)
    with pytest.raises(ValidationError, match="RLHF_MAX_PROMPT_TOKENS"):
        list(Client(url, headers=AUTH, timeout=30).generate_stream("word " * 200, max_new_tokens=5))

    async def run():
        await AsyncClient(url, headers=AUTH, timeout=30).generate("Hi", max_new_tokens=100000)

    with pytest.raises(ValidationError, match="max_new_tokens"):
        asyncio.run(run())
    reply = httpx.post(f"{url}/generate", json={"inputs": "", "parameters": {}}, headers=AUTH)
    assert reply.status_code == 422 and reply.json() == {
        "error": "`inputs` cannot be empty",
        "error_type": "validation",
    }


def test_root_route_info_health_metrics(server):
    handle, url = server
    reply = httpx.post(
        url + "/", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3, "details": True}}, headers=AUTH, timeout=30
    )
    assert reply.status_code == 200 and isinstance(reply.json(), list) and len(reply.json()) == 1
    assert reply.headers["x-model-version"] == handle.version
    info = httpx.get(f"{url}/info", headers=AUTH).json()
    assert info["model_id"] == handle.version and info["max_input_tokens"] == 64
    assert httpx.get(f"{url}/health").status_code == 200
    metrics = httpx.get(f"{url}/metrics").text
    for name in (
        "rlhf_generated_tokens_total",
        "rlhf_queue_depth",
        "rlhf_batch_size",
        "rlhf_serving_version_info",
        'rlhf_rpc_requests_total{code="200",method="/",service="policy-http"}',
    ):
        assert name in metrics


def test_overload_is_tgi_429(tmp_path, broker, tiny_model_dir):
    handle = start(
        make_settings(tmp_path, broker, RLHF_MAX_BATCH="1", RLHF_MAX_QUEUE="1", RLHF_TOKENS=TOKENS),
        port=0,
        http_port=0,
        follow=False,
    )
    try:
        url = f"http://127.0.0.1:{handle.http_port}"
        with httpx.Client(headers=AUTH, timeout=30) as http:
            with http.stream(
                "POST", f"{url}/generate_stream", json={"inputs": "Hi", "parameters": {"max_new_tokens": 500}}
            ) as busy:
                lines = busy.iter_lines()  # keep the iterator: dropping it closes the stream
                next(lines)
                with httpx.stream(
                    "POST",
                    f"{url}/generate_stream",
                    json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
                    headers=AUTH,
                ) as _queued:
                    with pytest.raises(OverloadedError):
                        Client(url, headers=AUTH, timeout=30).generate("Hi", max_new_tokens=2)
        # Both streams were closed by the client: their slots are freed without waiting for 500 tokens.
        deadline = time.monotonic() + 5
        while sum(handle.backend.engine.stats()[k] for k in ("running", "queued")) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert Client(url, headers=AUTH, timeout=30).generate("Hi", max_new_tokens=2).details.generated_tokens >= 1
    finally:
        handle.stop()


def test_tgi_backend_generates_through_a_tgi_endpoint(server, tmp_path, broker):
    upstream, url = server
    proxy = start(
        make_settings(tmp_path, broker, RLHF_TGI_URL=url, RLHF_TGI_TOKEN="usr", RLHF_TOKENS=TOKENS),
        port=0,
        http_port=None,
    )
    try:
        with (
            with_token(grpc.insecure_channel(f"127.0.0.1:{upstream.port}"), "usr") as a,
            with_token(grpc.insecure_channel(f"127.0.0.1:{proxy.port}"), "usr") as b,
        ):
            direct, via = policy_pb2_grpc.PolicyServiceStub(a), policy_pb2_grpc.PolicyServiceStub(b)
            request = policy_pb2.GenerateRequest(
                prompt="Hello",
                parameters=policy_pb2.GenerationParameters(
                    max_new_tokens=6, temperature=0.0, num_samples=2, return_logprobs=True
                ),
            )
            want, got = direct.Generate(request, timeout=30), via.Generate(request, timeout=30)
            assert got.model_version == want.model_version == upstream.version
            assert [s.text for s in got.samples] == [s.text for s in want.samples]
            assert [s.generated_tokens for s in got.samples] == [s.generated_tokens for s in want.samples]
            assert [t.id for t in got.samples[0].tokens] == [t.id for t in want.samples[0].tokens]
            streamed = list(via.GenerateStream(request, timeout=30))
            finals = [m for m in streamed if m.finish_reason]
            assert [m.generated_text for m in finals] == [s.text for s in want.samples]
            assert via.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).backend == "tgi"
            with pytest.raises(grpc.RpcError) as err:
                via.Generate(policy_pb2.GenerateRequest(prompt="word " * 200), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        proxy.stop()


def test_tgi_backend_sends_k_samples_at_once_and_a_cancel_stops_them_all(server, tmp_path, broker):
    upstream, url = server
    proxy = start(
        make_settings(tmp_path, broker, RLHF_TGI_URL=url, RLHF_TGI_TOKEN="usr", RLHF_TOKENS=TOKENS),
        port=0,
        http_port=None,
    )
    engine = upstream.backend.engine

    def peak_running(seconds: float, until=lambda: False) -> int:
        """The most upstream rows seen at once, watching until 4 run, `until()` or the time is up."""
        peak, deadline = 0, time.monotonic() + seconds
        while peak < 4 and not until() and time.monotonic() < deadline:
            peak = max(peak, engine.stats()["running"])
            time.sleep(0.005)
        return peak

    try:
        with with_token(grpc.insecure_channel(f"127.0.0.1:{proxy.port}"), "usr") as channel:
            via = policy_pb2_grpc.PolicyServiceStub(channel)
            # Greedy decoding of the tiny model runs to the limit: long enough to see all four upstream at once.
            request = policy_pb2.GenerateRequest(
                prompt="Count to a thousand.",
                parameters=policy_pb2.GenerationParameters(max_new_tokens=300, temperature=0.0, num_samples=4),
            )
            future = via.Generate.future(request, timeout=60)
            assert peak_running(30, until=future.done) == 4  # K requests upstream together, batched by the engine
            reply = future.result()
            assert [s.generated_tokens for s in reply.samples] == [300] * 4 and reply.usage.completion_tokens == 1200

            stream = via.GenerateStream(request, timeout=60)
            next(stream)
            assert peak_running(10) == 4
            stream.cancel()
            deadline = time.monotonic() + 3
            while engine.stats()["running"] and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engine.stats()["running"] == 0  # every upstream sample was stopped
    finally:
        proxy.stop()


@pytest.mark.parametrize(
    "path, body",
    [
        ("/generate_stream", {"inputs": "Tell me", "parameters": {"max_new_tokens": 1900}}),
        ("/v1/completions", {"model": "policy", "prompt": "Tell me", "max_tokens": 1900, "stream": True}),
    ],
)
def test_a_stream_reader_that_disconnects_cancels_its_generation(tmp_path, broker, tiny_model_dir, path, body):
    settings = make_settings(
        tmp_path, broker, RLHF_TOKENS=TOKENS, RLHF_MAX_NEW_TOKENS_LIMIT="1900", RLHF_MAX_PROMPT_TOKENS="64"
    )
    handle = start(settings, port=0, http_port=0, follow=False)
    backend, ends = handle.backend, {}
    submit = backend.submit

    def noting_the_end(req):  # records when and how each request ended, then submits it as usual
        sink = req.sink

        def sink_and_note(event):
            if isinstance(event, (Finished, Failed)):
                ends[id(req)] = (time.monotonic(), event)
            sink(event)

        req.sink = sink_and_note
        ends[id(req)] = None
        submit(req)

    backend.submit = noting_the_end
    try:
        # The tiny model can finish all 1,900 tokens before the client has read its first line;
        # such a try says nothing, so try again until the reader leaves a generation in progress.
        for _ in range(5):
            known = set(ends)
            with httpx.Client(timeout=30) as client:
                url = f"http://127.0.0.1:{handle.http_port}{path}"
                with client.stream("POST", url, json=body, headers=AUTH) as reply:
                    assert reply.status_code == 200
                    next(reply.iter_lines())
            left = time.monotonic()
            (key,) = set(ends) - known
            deadline = time.monotonic() + 5
            while ends[key] is None and time.monotonic() < deadline:
                time.sleep(0.005)
            assert ends[key] is not None, "the generation did not end after its reader left"
            ended, event = ends[key]
            if ended > left:
                break
        else:
            pytest.fail("every generation finished before its reader left")
        assert isinstance(event, Failed) and event.error.status == Status.CANCELLED, event
        while backend.engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.005)  # the row leaves the batch just after its request is failed
        assert backend.engine.stats()["running"] == 0
    finally:
        handle.stop()
