"""The policy service's HTTP API, the one clients call over HTTP (FastAPI +
uvicorn, in the policy process, on RLHF_HTTP_PORT). Two dialects share one
port, one authentication and one submission path (`Gateway`):

TGI-compatible (this module), so the unmodified `text_generation` client
(Client and AsyncClient) works against it:
  POST /generate          -> {"generated_text", "details"?}
  POST /generate_stream   -> server-sent events, one per token, the last with
                             generated_text and details
  POST /                  -> [response], or SSE when "stream": true
  GET  /info
Errors are {"error", "error_type"} with TGI's status codes (422 validation,
429 overloaded, 424 generation, 401/403 auth, 404/405 unknown route or
method), so TGI's client raises its typed errors. `inputs` is raw text (no
chat template), as in TGI.

OpenAI-compatible (services/policy/openai_api.py): /v1/chat/completions,
/v1/completions, /v1/models, with OpenAI's error shape.

Every route but GET /health and GET /metrics needs `Authorization: Bearer
<token>` (role `user`; RLHF_ANONYMOUS_GENERATE opens them to callers without
a token). Every response names the model version in `x-model-version`.
Served prompts are logged as training data (services/policy/prompt_log.py).
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.auth import Authenticator, Identity
from services.common.config import Settings
from services.common.errors import Status, StatusError
from services.common.logs import get_logger
from services.common.metrics import RPC_LATENCY, RPC_REQUESTS
from services.common.streaming import StreamUntilEnd
from services.policy import prompt_log as plog
from services.policy.params import (
    FINISH_EOS,
    FINISH_STOP,
    MAX_STOP_SEQUENCES,
    GenParams,
    SampleOut,
    TokenOut,
    check_prompt,
    invalid,
    validate,
)
from services.policy.request import Failed, Finished, GenRequest, SampleDone, Token, loop_sink

log = get_logger(__name__)

SERVICE = "policy-http"
_TGI_FINISH = {FINISH_EOS: "eos_token", FINISH_STOP: "stop_sequence"}
# TGI's (status, error_type) per outcome; anything else is a 424 generation error.
_TGI_ERRORS = {
    Status.INVALID_ARGUMENT: (422, "validation"),
    Status.RESOURCE_EXHAUSTED: (429, "overloaded"),
    Status.UNAUTHENTICATED: (401, "authentication"),
    Status.PERMISSION_DENIED: (403, "permission_denied"),
    Status.NOT_FOUND: (404, "not_found"),
}
_UNSUPPORTED = ("typical_p", "frequency_penalty", "top_n_tokens", "grammar")


def tgi_error(err: StatusError, version: str = "") -> JSONResponse:
    status, kind = _TGI_ERRORS.get(err.status, (424, "generation"))
    return JSONResponse(
        {"error": err.message, "error_type": kind}, status_code=status, headers={"x-model-version": version}
    )


def number(params: dict, name: str, kind=float, where: str = ""):
    """A numeric field of a JSON object (None when absent or null); INVALID_ARGUMENT otherwise."""
    value = params.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not float(value).is_integer())
    ):
        raise invalid(f"`{where}{name}` must be a{'n integer' if kind is int else ' number'}; got {value!r}")
    if not math.isfinite(value):
        raise invalid(f"`{where}{name}` must be finite; got {value!r}")
    return kind(value)


class Gateway:
    """What the TGI and OpenAI routes share: authentication, the JSON body,
    submission to the backend (with prompt logging) and reading its events."""

    def __init__(self, settings: Settings, backend, auth: Authenticator, prompt_log: plog.PromptLog | None):
        self.settings = settings
        self.backend = backend
        self.auth = auth
        self.prompt_log = prompt_log

    def identify(self, request: Request) -> Identity:
        return self.auth.identify(request.headers.get("authorization"), "user", open_to_anonymous=True)

    @staticmethod
    async def read_json(request: Request) -> Any:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise invalid("the body is not valid JSON") from None
        where = _lone_surrogate(body)
        if where is not None:  # JSON's \ud800 escapes decode to text that is not valid Unicode
            raise invalid(f"`{where}` holds a lone surrogate (\\ud800-\\udfff escape), which is not valid text")
        return body

    def encode(self, text: str) -> list[int]:
        return self.backend.tokenizer(text, add_special_tokens=False).input_ids

    def submit(
        self,
        request: Request,
        identity: Identity,
        source: str,
        prompt_ids: list[int],
        params: GenParams,
        stream: bool,
        prompt_text: str,
        user_text: str,
        messages: list[dict] | None = None,
        log_default: bool | None = None,
    ) -> tuple[GenRequest, asyncio.Queue]:
        """Check the prompt, queue the generation and log the prompt (`user_text`:
        the user's own words). `log_default` overrides the token's default, e.g.
        an OpenAI request's `store`; the rlhf-log-prompt header wins over both."""
        check_prompt(self.settings, prompt_ids, params)
        header = request.headers.get(plog.LOG_HEADER)
        if header is None and log_default is not None:
            header = "true" if log_default else "false"
        log_it = self.prompt_log is not None and plog.wanted(identity, header)
        events: asyncio.Queue = asyncio.Queue()
        req = GenRequest(prompt_ids, params, loop_sink(events), stream=stream, prompt_text=prompt_text)
        self.backend.submit(req)
        if log_it:
            self.prompt_log.record(identity, source, self.backend.version, user_text, messages or ())
        return req, events

    @staticmethod
    async def collect(
        request: Request, req: GenRequest, events: asyncio.Queue
    ) -> tuple[list[SampleOut], Finished] | None:
        """Wait for a non-streaming request's samples; None if the client went away.
        A failed generation raises its StatusError."""
        samples: list[SampleOut] = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        return None
                    continue
                if isinstance(event, SampleDone):
                    samples.append(event.sample)
                elif isinstance(event, Failed):
                    raise event.error
                elif isinstance(event, Finished):
                    return sorted(samples, key=lambda s: s.index), event
        finally:
            req.cancel()  # no-op once finished; frees the slot if the client went away

    @staticmethod
    async def tokens(events: asyncio.Queue) -> AsyncIterator[Token]:
        """A streaming request's tokens until it finishes; a failure raises its StatusError.
        Stream them in a `StreamUntilEnd` with `on_end=req.cancel`, so that a client that
        disconnects frees its slot at once."""
        while True:
            event = await events.get()
            if isinstance(event, Token):
                yield event
            elif isinstance(event, Failed):
                raise event.error
            elif isinstance(event, Finished):
                return


def _lone_surrogate(value: Any, path: str = "body") -> str | None:
    """The path of the first string in a JSON value that holds a lone surrogate, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _lone_surrogate(key, path) or _lone_surrogate(item, f"{path}.{key}" if path != "body" else key)
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, f"{path}[{i}]")
            if found:
                return found
    return None


class _TgiRequest:
    """A TGI request body turned into our validated form."""

    def __init__(self, settings: Settings, gateway: Gateway, body: Any):
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

        temperature = number(params, "temperature")
        top_p = number(params, "top_p")
        top_k = number(params, "top_k", int)
        rep = number(params, "repetition_penalty")
        max_new = number(params, "max_new_tokens", int)
        seed = number(params, "seed", int)
        truncate = number(params, "truncate", int)
        best_of = number(params, "best_of", int) or 1
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
        ids = gateway.encode(inputs)
        if truncate is not None:
            ids = ids[-truncate:]
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
    streaming response and its client's disconnect notice. Requests that match
    no route count under "unmatched", so random paths cannot grow the label set."""

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
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            RPC_REQUESTS.labels(SERVICE, path, str(status[0])).inc()
            RPC_LATENCY.labels(SERVICE, path).observe(time.perf_counter() - started)


def build_app(settings: Settings, backend, auth: Authenticator, prompt_log: plog.PromptLog | None = None) -> FastAPI:
    from services.policy import openai_api

    app = FastAPI(title="RLHF policy (TGI- and OpenAI-compatible)", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_HttpMetrics)
    gateway = Gateway(settings, backend, auth, prompt_log)

    @app.exception_handler(StarletteHTTPException)
    async def unknown_route_or_method(request: Request, exc: StarletteHTTPException):
        """Unknown routes and methods answer in the dialect of the path, not FastAPI's {"detail"}."""
        status = {404: Status.NOT_FOUND, 405: Status.FAILED_PRECONDITION}.get(exc.status_code, Status.INTERNAL)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if request.url.path.startswith("/v1/"):
            return openai_api.error_response(StatusError(status, message), http_status=exc.status_code)
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
        return JSONResponse({"error": message, "error_type": kind}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        """A bug still answers in the dialect of the path (and is logged with its traceback)."""
        log.exception("HTTP request failed", extra={"fields": {"path": request.url.path, "error": repr(exc)}})
        err = StatusError(Status.INTERNAL, f"internal error: {type(exc).__name__}")
        if request.url.path.startswith("/v1/"):
            return openai_api.error_response(err)
        return JSONResponse({"error": err.message, "error_type": "generation"}, status_code=500)

    async def tgi_generate(request: Request, parsed: _TgiRequest) -> Response:
        identity = request.state.identity
        req, events = gateway.submit(
            request, identity, "tgi", parsed.prompt_ids, parsed.params, False, parsed.inputs, parsed.inputs
        )
        done = await gateway.collect(request, req, events)
        if done is None:
            return Response(status_code=499)
        samples, finished = done
        sampled = not parsed.params.greedy
        # best_of: return the sample the model finds most likely, the rest as best_of_sequences.
        ranked = sorted(samples, key=lambda s: -sum(t.logprob or 0.0 for t in s.tokens))
        best = ranked[0]
        body: dict[str, Any] = {"generated_text": parsed.text(best)}
        if parsed.details:
            body["details"] = _details(best, sampled, finished.prefill)
            if parsed.best_of > 1:
                body["details"]["best_of_sequences"] = [
                    {"generated_text": parsed.text(s), **_details(s, sampled, finished.prefill)} for s in ranked[1:]
                ]
        return JSONResponse(body, headers={"x-model-version": finished.version})

    def tgi_stream(request: Request, parsed: _TgiRequest) -> Response:
        if parsed.best_of > 1:
            raise invalid("`best_of` is not supported when streaming")
        if parsed.decoder_input_details:
            raise invalid("`decoder_input_details` == true is not supported when streaming tokens")
        req, events = gateway.submit(
            request, request.state.identity, "tgi", parsed.prompt_ids, parsed.params, True, parsed.inputs, parsed.inputs
        )

        async def sse():
            try:
                async for event in gateway.tokens(events):
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
            except StatusError as err:
                _, kind = _TGI_ERRORS.get(err.status, (424, "generation"))
                yield f"data:{json.dumps({'error': err.message, 'error_type': kind})}\n\n"

        return StreamUntilEnd(
            sse(), on_end=req.cancel, media_type="text/event-stream", headers={"x-model-version": backend.version}
        )

    async def tgi_route(request: Request, stream: bool | None = None) -> Response:
        try:
            request.state.identity = gateway.identify(request)
            parsed = _TgiRequest(settings, gateway, await gateway.read_json(request))
            if parsed.stream if stream is None else stream:
                return tgi_stream(request, parsed)
            return await tgi_generate(request, parsed)
        except StatusError as err:
            return tgi_error(err, version_or_empty(backend))

    @app.post("/generate")
    async def generate(request: Request):
        return await tgi_route(request, stream=False)

    @app.post("/generate_stream")
    async def generate_stream(request: Request):
        return await tgi_route(request, stream=True)

    @app.post("/")
    async def compat(request: Request):
        response = await tgi_route(request)
        if isinstance(response, JSONResponse) and response.status_code == 200:
            body = json.loads(response.body)
            return JSONResponse([body], headers={"x-model-version": response.headers.get("x-model-version", "")})
        return response

    @app.get("/info")
    async def info(request: Request):
        try:
            gateway.identify(request)
            model = backend.model_info()
        except StatusError as err:
            return tgi_error(err, version_or_empty(backend))
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
            return tgi_error(err)
        return JSONResponse({}, headers={"x-model-version": version})

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    openai_api.add_routes(app, gateway)
    return app


def version_or_empty(backend) -> str:
    try:
        return backend.version
    except StatusError:
        return ""


class HttpServer:
    """uvicorn in a background thread of the policy process, on a socket we bind
    (so port 0 works and the real port is known before serving)."""

    def __init__(
        self,
        settings: Settings,
        backend,
        port: int,
        auth: Authenticator | None = None,
        prompt_log: plog.PromptLog | None = None,
    ):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((settings.bind_host, port))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            build_app(settings, backend, auth or Authenticator.from_settings(settings), prompt_log),
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
