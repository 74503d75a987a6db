"""The web playground's backend: static pages plus a small JSON/SSE API that
forwards to the PolicyService and FeedbackService.

API (every /api route but /api/config needs `Authorization: Bearer <token>`):
  POST /api/session          -> {user_id, role}: sign-in check
  GET  /api/config           -> flags, K limits, the model now serving
  POST /api/generate         -> text/event-stream: `prompt`, `token`..., `done` | `error`
  POST /api/samples          -> K samples of one prompt, for ranking
  POST /api/submission       -> {replies}: a labeling batch's ranking, labels and demonstration
                                as one validate-first BulkSubmit (a bad field writes none of them);
                                the page submits this way
  POST /api/comparison       -> FeedbackService.SubmitComparison
  POST /api/labels           -> FeedbackService.SubmitLabels
  POST /api/demonstration    -> FeedbackService.SubmitDemonstration

A refused call answers {"error": {"code", "message", "service"}} with the
HTTP status that matches the gRPC status (google.rpc's mapping), so the page
shows the service's own words.
"""

from __future__ import annotations

import json
import socket
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from rlhf.v1 import feedback_pb2, policy_pb2

from services.common.auth import Authenticator, load_tokens
from services.common.config import Settings
from services.common.errors import StatusError, grpc_code
from services.common.logs import get_logger, log_fields
from services.playground.client import (
    FLAG_NAMES,
    LIKERT_MAX,
    LIKERT_MIN,
    MAX_K,
    MIN_K,
    GenerationOptions,
    PlaygroundClient,
    PlaygroundError,
    comparison_request,
    demonstration_request,
    flag_label,
    labels_request,
    next_or_error,
)

log = get_logger(__name__)
STATIC_DIR = Path(__file__).parent / "static"

# gRPC status -> HTTP status, as google.rpc.Code documents it.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
# The page may load nothing from anywhere else (it must work offline).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class ChatTurn(BaseModel):
    role: str = Field(pattern="^(system|user|assistant)$")
    content: str


class GenerateBody(BaseModel):
    prompt: str = ""
    messages: list[ChatTurn] = []
    max_new_tokens: int = Field(0, ge=0)
    temperature: float | None = Field(None, ge=0)
    request_id: str = ""

    def options(self) -> GenerationOptions:
        return GenerationOptions(max_new_tokens=self.max_new_tokens, temperature=self.temperature)


class SamplesBody(GenerateBody):
    k: int


class RankedBody(BaseModel):
    text: str
    policy_version: str = ""
    rank: int = Field(ge=0)


class ComparisonBody(BaseModel):
    request_id: str
    prompt_id: str = ""
    prompt_text: str = ""
    responses: list[RankedBody]


class LabelsBody(BaseModel):
    request_id: str
    prompt_id: str = ""
    prompt_text: str = ""
    response: str
    policy_version: str = ""
    likert: int = Field(0, ge=0)
    flags: list[str] = []


class DemonstrationBody(BaseModel):
    request_id: str
    prompt_id: str = ""
    prompt_text: str = ""
    response: str


class SubmissionBody(BaseModel):
    """One labeling submission: written together or not at all."""

    comparison: ComparisonBody | None = None
    labels: list[LabelsBody] = []
    demonstration: DemonstrationBody | None = None


def error_body(err: PlaygroundError) -> dict:
    return {"error": {"code": err.code.name, "message": err.message, "service": err.service}}


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def create_app(settings: Settings, client: PlaygroundClient | None = None) -> FastAPI:
    own_client = client is None
    client = client or PlaygroundClient(settings)
    auth = Authenticator(load_tokens(settings))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        if own_client:  # close the gRPC channels so shutdown does not wait on them
            client.close()

    app = FastAPI(title="RLHF playground", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.client = client

    def identify(request: Request, need: str = "user") -> str:
        """Check the caller's token for this page and return it for forwarding."""
        header = request.headers.get("authorization")
        try:
            auth.identify(header, need)
        except StatusError as err:
            raise PlaygroundError(grpc_code(err.status), err.message) from None
        return header.partition(" ")[2].strip()

    @app.exception_handler(PlaygroundError)
    async def on_playground_error(_request: Request, err: PlaygroundError):
        return JSONResponse(error_body(err), status_code=HTTP_STATUS.get(err.code, 500))

    @app.exception_handler(RequestValidationError)
    async def on_bad_body(_request: Request, err: RequestValidationError):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        err = PlaygroundError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {first.get('msg', 'invalid value')}")
        return JSONResponse(error_body(err), status_code=400)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/api/config")
    async def config():
        return {
            "k_min": MIN_K,
            "k_max": MAX_K,
            "likert_min": LIKERT_MIN,
            "likert_max": LIKERT_MAX,
            "flags": [{"name": name, "label": flag_label(name)} for name in FLAG_NAMES],
        }

    @app.post("/api/session")
    async def session(request: Request):
        header = request.headers.get("authorization")
        try:
            identity = auth.identify(header, "user")
        except StatusError as err:
            raise PlaygroundError(grpc_code(err.status), err.message) from None
        return {"user_id": identity.user_id, "role": identity.role, "labeler": identity.may("labeler")}

    @app.get("/api/model")
    async def model(request: Request):
        info = await run_in_threadpool(client.model_info, identify(request))
        return {"version": info.version, "kind": info.kind, "backend": info.backend}

    @app.post("/api/generate")
    async def generate(body: GenerateBody, request: Request):
        token = identify(request)
        messages = [m.model_dump() for m in body.messages]
        if not body.prompt.strip() and not messages:
            raise PlaygroundError(grpc.StatusCode.INVALID_ARGUMENT, "prompt: type a prompt (or send chat messages)")
        logged = await run_in_threadpool(
            client.log_prompt, token, body.prompt, messages, "chat" if messages else "prompt", body.request_id
        )
        call = client.stream(token, body.prompt, messages, body.options())
        try:
            # Pull the first message before answering, so an immediate refusal
            # (prompt too long, queue full) becomes a proper HTTP status.
            first = await run_in_threadpool(next_or_error, call)
        except PlaygroundError:
            call.cancel()
            raise

        async def events():
            message = first
            try:
                yield sse("prompt", {"event_id": logged["event_id"], "duplicate": logged["duplicate"]})
                while message is not None:
                    if message.token.text and not message.token.special:
                        yield sse("token", {"text": message.token.text, "model_version": message.model_version})
                    if message.finish_reason:
                        yield sse(
                            "done",
                            {
                                "text": message.generated_text,
                                "model_version": message.model_version,
                                "finish_reason": policy_pb2.FinishReason.Name(message.finish_reason),
                                "completion_tokens": message.usage.completion_tokens,
                            },
                        )
                    message = await run_in_threadpool(next_or_error, call)
            except PlaygroundError as err:
                yield sse("error", error_body(err)["error"])
            finally:
                call.cancel()  # the reader left (or we are done): free the policy's slot at once

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )

    @app.post("/api/samples")
    async def samples(body: SamplesBody, request: Request):
        token = identify(request)
        result = await run_in_threadpool(client.samples, token, body.prompt, body.k, body.options(), body.request_id)
        return {
            "prompt_event_id": result.prompt_event_id,
            "model_version": result.model_version,
            "samples": [{"text": t, "finish_reason": f} for t, f in zip(result.texts, result.finish_reasons)],
        }

    @app.post("/api/comparison")
    async def comparison(body: ComparisonBody, request: Request):
        token = identify(request)
        return await run_in_threadpool(
            client.submit_comparison,
            token,
            body.request_id,
            body.prompt_text,
            [r.text for r in body.responses],
            [r.rank for r in body.responses],
            [r.policy_version for r in body.responses],
            body.prompt_id,
        )

    @app.post("/api/labels")
    async def labels(body: LabelsBody, request: Request):
        token = identify(request)
        return await run_in_threadpool(
            client.submit_labels,
            token,
            body.request_id,
            body.prompt_text,
            body.response,
            body.policy_version,
            body.likert,
            body.flags,
            body.prompt_id,
        )

    @app.post("/api/submission")
    async def submission(body: SubmissionBody, request: Request):
        """The ranking, labels and demonstration of one labeling batch in one
        validate-first stream: a bad field in any of them writes none."""
        token = identify(request)
        items = []
        if body.comparison:
            c = body.comparison
            items.append(
                feedback_pb2.BulkItem(
                    comparison=comparison_request(
                        c.request_id,
                        c.prompt_text,
                        [r.text for r in c.responses],
                        [r.rank for r in c.responses],
                        [r.policy_version for r in c.responses],
                        c.prompt_id,
                    )
                )
            )
        for lab in body.labels:
            items.append(
                feedback_pb2.BulkItem(
                    labels=labels_request(
                        lab.request_id,
                        lab.prompt_text,
                        lab.response,
                        lab.policy_version,
                        lab.likert,
                        lab.flags,
                        lab.prompt_id,
                    )
                )
            )
        if body.demonstration:
            d = body.demonstration
            items.append(
                feedback_pb2.BulkItem(
                    demonstration=demonstration_request(d.request_id, d.prompt_text, d.response, d.prompt_id)
                )
            )
        if not items:
            raise PlaygroundError(
                grpc.StatusCode.INVALID_ARGUMENT, "nothing to submit: give a comparison, labels or a demonstration"
            )
        return {"replies": await run_in_threadpool(client.submit_together, token, items)}

    @app.post("/api/demonstration")
    async def demonstration(body: DemonstrationBody, request: Request):
        token = identify(request)
        return await run_in_threadpool(
            client.submit_demonstration, token, body.request_id, body.prompt_text, body.response, body.prompt_id
        )

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


@dataclass
class PlaygroundHandle:
    """A playground running in a background thread (tests, the local stack)."""

    server: uvicorn.Server
    thread: threading.Thread
    port: int
    host: str

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, grace: float = 0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=max(grace, 5.0))


def start(settings: Settings, port: int | None = None) -> PlaygroundHandle:
    """Serve the playground on bind_host:port (default RLHF_PLAYGROUND_PORT; 0 picks a free port)."""
    port = settings.playground_port if port is None else port
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.bind_host, port))
    config = uvicorn.Config(create_app(settings), log_config=None, access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="playground-http", daemon=True)
    thread.start()
    handle = PlaygroundHandle(server, thread, sock.getsockname()[1], settings.bind_host)
    _wait_started(handle)
    log_fields(log, 20, "playground started", url=handle.url)
    return handle


def _wait_started(handle: PlaygroundHandle, timeout: float = 15.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not handle.server.started:
        if not handle.thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"playground did not start on port {handle.port}")
        time.sleep(0.02)
