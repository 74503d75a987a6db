"""The web playground's backend: static pages plus a small JSON/SSE API that
forwards to the PolicyService, FeedbackService and LabelingService.

API (every /api route but /api/config needs `Authorization: Bearer <token>`):
  POST /api/session          -> {user_id, role}: sign-in check
  GET  /api/config           -> flags and the Likert range
  GET  /api/model            -> the model now serving
  POST /api/generate         -> text/event-stream: `prompt`, `token`..., `done` | `error`
  GET  /api/task             -> LabelingService.NextTask: the caller's leased task
  POST /api/task             -> LabelingService.SubmitTask: a demonstration, or every
                                sample's Likert score, flags and rank; all or nothing
  GET  /api/stats            -> LabelingService.GetStats: agreement and quality (the dashboard)

A refused call answers {"error": {"code", "message", "service"}} with the
HTTP status of its StatusError (services/common/errors.py), so the page
shows the service's own words.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from google.protobuf.json_format import MessageToDict
from pydantic import BaseModel, Field
from rlhf.v1 import policy_pb2

from services.common.auth import Authenticator, load_tokens
from services.common.config import Settings
from services.common.errors import StatusError, http_status, invalid
from services.common.feedback import CHAT_ROLES
from services.common.logs import get_logger, log_fields
from services.common.streaming import StreamUntilEnd
from services.playground.client import (
    FLAG_NAMES,
    LIKERT_MAX,
    LIKERT_MIN,
    GenerationOptions,
    Judgement,
    PlaygroundClient,
    flag_label,
    next_or_error,
    service_of,
)

log = get_logger(__name__)
STATIC_DIR = Path(__file__).parent / "static"

# The page may load nothing from anywhere else (it must work offline).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class ChatTurn(BaseModel):
    role: str = Field(pattern="^(" + "|".join(CHAT_ROLES) + ")$")
    content: str


class GenerateBody(BaseModel):
    prompt: str = ""
    messages: list[ChatTurn] = []
    max_new_tokens: int = Field(0, ge=0)
    temperature: float | None = Field(None, ge=0)
    request_id: str = ""

    def options(self) -> GenerationOptions:
        return GenerationOptions(max_new_tokens=self.max_new_tokens, temperature=self.temperature)


class JudgementBody(BaseModel):
    """One sample's Likert score, flags and rank: the page sends a list of these."""

    sample_id: str
    likert: int = Field(0, ge=0)
    rank: int = Field(0, ge=0)
    flags: list[str] = []

    def value(self) -> Judgement:
        return Judgement(self.sample_id, self.likert, self.rank, tuple(self.flags))


class SubmitTaskBody(BaseModel):
    task_id: str
    demonstration: str = ""
    judgements: list[JudgementBody] = []


def error_body(err: StatusError) -> dict:
    return {"error": {"code": err.status.name, "message": err.message, "service": service_of(err)}}


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
        auth.identify(header, need)  # raises StatusError: UNAUTHENTICATED or PERMISSION_DENIED
        return header.partition(" ")[2].strip()

    @app.exception_handler(StatusError)
    async def on_status_error(_request: Request, err: StatusError):
        return JSONResponse(error_body(err), status_code=http_status(err.status))

    @app.exception_handler(RequestValidationError)
    async def on_bad_body(_request: Request, err: RequestValidationError):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        err = invalid(f"{where}: {first.get('msg', 'invalid value')}")
        return JSONResponse(error_body(err), status_code=http_status(err.status))

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
            "likert_min": LIKERT_MIN,
            "likert_max": LIKERT_MAX,
            "flags": [{"name": name, "label": flag_label(name)} for name in FLAG_NAMES],
        }

    @app.post("/api/session")
    async def session(request: Request):
        header = request.headers.get("authorization")
        identity = auth.identify(header, "user")
        return {"user_id": identity.user_id, "role": identity.role, "labeler": identity.may("labeler")}

    @app.get("/api/model")
    async def model(request: Request):
        token = identify(request)
        info = await run_in_threadpool(client.model_info, token)
        return {"version": info.version, "kind": info.kind, "backend": info.backend}

    @app.post("/api/generate")
    async def generate(body: GenerateBody, request: Request):
        token = identify(request)
        messages = [m.model_dump() for m in body.messages]
        if not body.prompt.strip() and not messages:
            raise invalid("prompt: type a prompt (or send chat messages)")
        logged = await run_in_threadpool(
            client.log_prompt, token, body.prompt, messages, "chat" if messages else "prompt", body.request_id
        )
        call = client.stream(token, body.prompt, messages, body.options())
        try:
            # Pull the first message before answering, so an immediate refusal
            # (prompt too long, queue full) becomes a proper HTTP status.
            first = await run_in_threadpool(next_or_error, call)
        except StatusError:
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
            except StatusError as err:
                yield sse("error", error_body(err)["error"])

        return StreamUntilEnd(
            events(),
            on_end=call.cancel,  # the reader left (or we are done): free the policy's slot at once
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @app.get("/api/task")
    async def next_task(request: Request):
        token = identify(request, "labeler")
        task = await run_in_threadpool(client.next_task, token)
        return task.as_dict()

    @app.post("/api/task")
    async def submit_task(body: SubmitTaskBody, request: Request):
        """One task's whole submission: the service checks it all, then writes it, or writes nothing."""
        token = identify(request, "labeler")
        judgements = [j.value() for j in body.judgements]
        return await run_in_threadpool(
            lambda: client.submit_task(token, body.task_id, judgements=judgements, demonstration=body.demonstration)
        )

    @app.get("/api/stats")
    async def stats(request: Request):
        token = identify(request, "labeler")
        reply = await run_in_threadpool(client.stats, token)
        return MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)

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
    log_fields(log, logging.INFO, "playground started", url=handle.url)
    return handle


def _wait_started(handle: PlaygroundHandle, timeout: float = 15.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not handle.server.started:
        if not handle.thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"playground did not start on port {handle.port}")
        time.sleep(0.02)
