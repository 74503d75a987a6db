"""The policy service's TGI-compatible HTTP API (FastAPI + uvicorn, in the
policy process, on RLHF_HTTP_PORT).

Routes and JSON follow Text Generation Inference, so the unmodified
`text_generation` client (Client and AsyncClient) works against it:
  POST /generate          -> {"generated_text", "details"?}
  POST /generate_stream   -> server-sent events, one per token, the last with
                             generated_text and details
  POST /                  -> [response], or SSE when "stream": true
  GET  /info, /health, /metrics
Errors are {"error", "error_type"} with TGI's status codes: 422 validation,
429 overloaded, 424 generation. `inputs` is raw text (no chat template), as
in TGI. Every response carries the model version in `x-model-version`.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.common.config import Settings
from services.common.errors import Status, StatusError
from services.common.logs import get_logger
from services.common.metrics import RPC_LATENCY, RPC_REQUESTS
from services.policy.params import (
    FINISH_EOS,
    FINISH_STOP,
    MAX_STOP_SEQUENCES,
    SampleOut,
    TokenOut,
    check_prompt,
    invalid,
    validate,
)
from services.policy.request import Failed, Finished, GenRequest, SampleDone, Token

log = get_logger(__name__)

SERVICE = "policy-http"
_TGI_FINISH = {FINISH_EOS: "eos_token", FINISH_STOP: "stop_sequence"}
# TGI's error kinds for our statuses; every other failure is TGI's 424 "generation".
_ERRORS = {
    Status.INVALID_ARGUMENT: (422, "validation"),
    Status.RESOURCE_EXHAUSTED: (429, "overloaded"),
}
_UNSUPPORTED = ("typical_p", "frequency_penalty", "top_n_tokens", "grammar")


def _error(err: StatusError, version: str = "") -> JSONResponse:
    status, kind = _ERRORS.get(err.status, (424, "generation"))
    return JSONResponse(
        {"error": err.message, "error_type": kind}, status_code=status, headers={"x-model-version": version}
    )


class _Parsed:
    """A TGI request body turned into our validated form."""

    def __init__(self, settings: Settings, tokenizer, body: Any):
        if not isinstance(body, dict):
            raise invalid("the body must be a JSON object with `inputs`")
        inputs = body.get("inputs")
        if not isinstance(inputs, str) or not inputs:
            raise invalid("`inputs` cannot be empty")
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise invalid("`parameters` must be an object")
        for name in _UNSUPPORTED:
            if params.get(name) is not None:
                raise invalid(f"`{name}` is not supported by this server")
        if params.get("watermark"):
            raise invalid("`watermark` is not supported by this server")

        def number(name: str, kind=float):
            value = params.get(name)
            if value is None:
                return None
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or (kind is int and not float(value).is_integer())
            ):
                raise invalid(f"`{name}` must be a{'n integer' if kind is int else ' number'}; got {value!r}")
            return kind(value)

        temperature = number("temperature")
        top_p = number("top_p")
        top_k = number("top_k", int)
        rep = number("repetition_penalty")
        max_new = number("max_new_tokens", int)
        seed = number("seed", int)
        truncate = number("truncate", int)
        best_of = number("best_of", int) or 1
        # TGI's rules: these must be strictly positive when given.
        for name, value in (
            ("temperature", temperature),
            ("top_k", top_k),
            ("truncate", truncate),
            ("best_of", best_of),
            ("max_new_tokens", max_new),
        ):
            if value is not None and value <= 0:
                raise invalid(f"`{name}` must be strictly positive; got {value}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise invalid(f"`top_p` must be > 0.0 and <= 1.0; got {top_p}")
        stop = params.get("stop") or []
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise invalid("`stop` must be a list of strings")
        if len(stop) > MAX_STOP_SEQUENCES:
            raise invalid(f"`stop` has {len(stop)} sequences; the limit is {MAX_STOP_SEQUENCES}")
        # TGI samples when asked to, or when any sampling knob moves off neutral.
        sampling = (
            bool(params.get("do_sample"))
            or best_of > 1
            or (temperature not in (None, 1.0))
            or bool(top_k)
            or (top_p not in (None, 1.0))
        )
        if best_of > 1 and seed is not None:
            raise invalid("`seed` must not be set when `best_of` is > 1")
        self.stream = bool(body.get("stream"))
        self.details = bool(params.get("details"))
        self.decoder_input_details = bool(params.get("decoder_input_details"))
        self.return_full_text = bool(params.get("return_full_text"))
        self.best_of = best_of
        self.inputs = inputs
        self.params = validate(
            settings,
            max_new_tokens=max_new if max_new is not None else 20,  # TGI's default
            temperature=(temperature or 1.0) if sampling else 0.0,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=rep,
            stop=stop,
            seed=seed,
            num_samples=best_of,
            return_logprobs=True,  # TGI reports each token's logprob in details
            prompt_logprobs=self.decoder_input_details and self.details,  # details.prefill
        )
        ids = tokenizer(inputs, add_special_tokens=False).input_ids
        if truncate is not None:
            ids = ids[-truncate:]
        check_prompt(settings, ids, self.params)
        self.prompt_ids = ids

    def text(self, sample: SampleOut) -> str:
        return (self.inputs + sample.text) if self.return_full_text else sample.text


def _token_json(tok) -> dict:
    logprob = tok.logprob if tok.logprob is None or math.isfinite(tok.logprob) else -1e30
    return {"id": tok.id, "text": tok.text, "logprob": logprob, "special": tok.special}


def _details(sample: SampleOut, sampled: bool, prefill: list[TokenOut]) -> dict:
    return {
        "finish_reason": _TGI_FINISH.get(sample.finish_reason, "length"),
        "generated_tokens": sample.generated_tokens,
        "seed": sample.seed if sampled else None,
        "prefill": [{k: v for k, v in _token_json(t).items() if k != "special"} for t in prefill],
        "tokens": [_token_json(t) for t in sample.tokens],
        "top_tokens": None,
    }


class _HttpMetrics:
    """Counts HTTP requests by route and status, and their latency (streams: until the last event).

    A plain ASGI middleware: starlette's BaseHTTPMiddleware would sit between a
    streaming response and its client's disconnect notice."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            RPC_REQUESTS.labels(SERVICE, scope["path"], str(status[0])).inc()
            RPC_LATENCY.labels(SERVICE, scope["path"]).observe(time.perf_counter() - started)


def build_app(settings: Settings, backend) -> FastAPI:
    app = FastAPI(title="RLHF policy (TGI-compatible)", docs_url=None, redoc_url=None, openapi_url=None)

    app.add_middleware(_HttpMetrics)

    def submit(parsed: _Parsed, stream: bool) -> tuple[GenRequest, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req = GenRequest(
            parsed.prompt_ids,
            parsed.params,
            lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
            stream=stream,
            prompt_text=parsed.inputs,
        )
        backend.submit(req)
        return req, events

    async def parse(request: Request) -> _Parsed:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise invalid("the body is not valid JSON") from None
        return _Parsed(settings, backend.tokenizer, body)

    async def generate_one(request: Request, parsed: _Parsed) -> Response:
        req, events = submit(parsed, stream=False)
        samples: list[SampleOut] = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                if isinstance(event, SampleDone):
                    samples.append(event.sample)
                elif isinstance(event, Failed):
                    return _error(event.error)
                elif isinstance(event, Finished):
                    return _response(parsed, samples, event.version, event.prefill)
        finally:
            req.cancel()  # no-op once finished; frees the slot if the client went away

    def _response(parsed: _Parsed, samples: list[SampleOut], version: str, prefill: list[TokenOut]) -> JSONResponse:
        sampled = not parsed.params.greedy
        # best_of: return the sample the model finds most likely, the rest as best_of_sequences.
        ranked = sorted(samples, key=lambda s: -sum(t.logprob or 0.0 for t in s.tokens))
        best = ranked[0]
        body: dict[str, Any] = {"generated_text": parsed.text(best)}
        if parsed.details:
            body["details"] = _details(best, sampled, prefill)
            if parsed.best_of > 1:
                body["details"]["best_of_sequences"] = [
                    {"generated_text": parsed.text(s), **_details(s, sampled, prefill)} for s in ranked[1:]
                ]
        return JSONResponse(body, headers={"x-model-version": version})

    def stream_events(parsed: _Parsed):
        if parsed.best_of > 1:
            raise invalid("`best_of` is not supported when streaming")
        if parsed.decoder_input_details:
            raise invalid("`decoder_input_details` == true is not supported when streaming tokens")
        req, events = submit(parsed, stream=True)

        async def sse():
            try:
                while True:
                    event = await events.get()
                    if isinstance(event, Token):
                        message: dict[str, Any] = {
                            "index": 0,
                            "token": _token_json(event.token),
                            "top_tokens": None,
                            "generated_text": None,
                            "details": None,
                        }
                        if event.final is not None:
                            message["generated_text"] = parsed.text(event.final)
                            message["details"] = {
                                "finish_reason": _TGI_FINISH.get(event.final.finish_reason, "length"),
                                "generated_tokens": event.final.generated_tokens,
                                "seed": event.final.seed if not parsed.params.greedy else None,
                            }
                        yield f"data:{json.dumps(message)}\n\n"
                    elif isinstance(event, Failed):
                        _, kind = _ERRORS.get(event.error.status, (424, "generation"))
                        yield f"data:{json.dumps({'error': event.error.message, 'error_type': kind})}\n\n"
                        return
                    elif isinstance(event, Finished):
                        return
            finally:
                req.cancel()  # a client that disconnects frees its slot at once

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"x-model-version": backend.version})

    async def guarded(fn, request: Request, stream: bool | None = None):
        try:
            parsed = await parse(request)
            if parsed.stream if stream is None else stream:
                return stream_events(parsed)
            return await fn(request, parsed)
        except StatusError as err:
            return _error(err, backend.version)

    @app.post("/generate")
    async def generate(request: Request):
        return await guarded(generate_one, request, stream=False)

    @app.post("/generate_stream")
    async def generate_stream(request: Request):
        return await guarded(generate_one, request, stream=True)

    @app.post("/")
    async def compat(request: Request):
        response = await guarded(generate_one, request)
        if isinstance(response, JSONResponse) and response.status_code == 200:
            body = json.loads(response.body)
            return JSONResponse([body], headers={"x-model-version": response.headers.get("x-model-version", "")})
        return response

    @app.get("/info")
    async def info():
        model = backend.model_info()
        return {
            "model_id": model["version"],
            "model_sha": None,
            "model_dtype": settings.serve_dtype,
            "model_device_type": settings.device,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": settings.max_batch + settings.max_queue,
            "max_best_of": min(settings.max_samples, settings.max_batch),
            "max_stop_sequences": MAX_STOP_SEQUENCES,
            "max_input_tokens": settings.max_prompt_tokens,
            "max_input_length": settings.max_prompt_tokens,
            "max_total_tokens": settings.max_prompt_tokens + settings.max_new_tokens_limit,
            "validation_workers": 1,
            "max_client_batch_size": 1,
            "router": "rlhf-policy",
            "version": "rlhf-v1",
            "sha": None,
            "docker_label": None,
            "kind": model["kind"],
            "backend": model["backend"],
        }

    @app.get("/health")
    async def health():
        try:
            version = backend.version
        except StatusError as err:
            return _error(err)
        return JSONResponse({}, headers={"x-model-version": version})

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


class HttpServer:
    """uvicorn in a background thread of the policy process, on a socket we bind
    (so port 0 works and the real port is known before serving)."""

    def __init__(self, settings: Settings, backend, port: int):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((settings.bind_host, port))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            build_app(settings, backend),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(settings.grpc_grace_s),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="policy-http", daemon=True
        )

    def start(self, timeout: float = 30.0) -> HttpServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()
