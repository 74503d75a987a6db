"""The PolicyService: gRPC generation (unary and streaming, K samples per
prompt), the HTTP APIs on the same process (TGI- and OpenAI-compatible,
services/policy/http_api.py), and checkpoint hot-swap.

Every call but health is authenticated (bearer token, role `user`; PinVersion
needs `admin`); RLHF_ANONYMOUS_GENERATE opens generation to callers without a
token. Served prompts are logged as training data (services/policy/prompt_log.py).

Backends: the local continuous-batching engine (default) or, when
RLHF_TGI_URL is set, a TGI server through the `text_generation` client.
`start()` is the interface tests, the stack and the playground use.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc

from services.common.auth import Authenticator, Identity, metadata_value
from services.common.checkpoints import version_name_problem
from services.common.config import Settings
from services.common.errors import Status, StatusError, abort
from services.common.grpc_server import AioRunningServer, CallGate, start_aio_server
from services.common.logs import get_logger, log_fields
from services.common.models import render_prompt
from services.policy.backend import PolicyBackend
from services.policy.engine import LocalBackend
from services.policy.params import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, check_prompt, invalid, validate
from services.policy.prompt_log import LOG_HEADER, PromptLog, wanted
from services.policy.request import Failed, Finished, GenRequest, SampleDone, Token, loop_sink

log = get_logger(__name__)

SERVICE = "policy"
CHAT_ROLES = ("system", "user", "assistant")
_FINISH = {
    FINISH_LENGTH: policy_pb2.FINISH_REASON_LENGTH,
    FINISH_EOS: policy_pb2.FINISH_REASON_EOS,
    FINISH_STOP: policy_pb2.FINISH_REASON_STOP,
}


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    """The RPCs, as coroutines on the grpc.aio server's one event-loop thread.

    The engine's thread hands each request's events to that loop
    (`call_soon_threadsafe`), so a streamed token costs no thread hand-off:
    with a thread-pool server every token of every stream woke its handler
    thread, and on 2 cores those wake-ups were taken from the decode step."""

    def __init__(
        self, settings: Settings, backend: PolicyBackend, auth: Authenticator, prompt_log: PromptLog | None = None
    ):
        self.settings = settings
        self.backend = backend
        self.auth = auth
        self.prompt_log = prompt_log
        self.calls = CallGate("policy")

    # --- request building ---------------------------------------------------
    def _build(
        self, request: policy_pb2.GenerateRequest, context: grpc.aio.ServicerContext, stream: bool, identity: Identity
    ) -> tuple[GenRequest, asyncio.Queue]:
        p = request.parameters
        params = validate(
            self.settings,
            max_new_tokens=p.max_new_tokens,
            temperature=p.temperature if p.HasField("temperature") else None,
            top_p=p.top_p if p.HasField("top_p") else None,
            top_k=p.top_k,
            repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else None,
            stop=list(p.stop),
            seed=p.seed if p.HasField("seed") else None,
            num_samples=p.num_samples if p.HasField("num_samples") else None,
            return_logprobs=p.return_logprobs,
            prompt_logprobs=p.return_prompt_logprobs,
        )
        if stream and params.prompt_logprobs:
            raise invalid(
                "parameters.return_prompt_logprobs is for Generate; GenerateStream does not return prompt scores"
            )
        messages = None
        if request.messages:
            if request.prompt:
                raise invalid("set either prompt or messages, not both")
            for i, m in enumerate(request.messages):
                if m.role not in CHAT_ROLES:
                    raise invalid(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}; got {m.role!r}")
            if not any(m.content.strip() for m in request.messages):
                raise invalid("messages: every message content is empty")
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
        elif not request.prompt.strip():
            raise invalid("prompt is empty (set prompt or messages)")
        tokenizer = self.backend.tokenizer
        text = render_prompt(tokenizer, request.prompt, messages)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        check_prompt(self.settings, ids, params)
        log_it = self.prompt_log is not None and wanted(identity, metadata_value(context, LOG_HEADER))
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None and remaining < 1e8 else None
        events: asyncio.Queue = asyncio.Queue()
        req = GenRequest(ids, params, loop_sink(events), stream=stream, deadline=deadline, prompt_text=text)
        # Called when the RPC ends for any reason; an end before the request's own (the client
        # cancelled or went away, the deadline passed) frees its slot. A `finally` in the handler
        # would not do: a cancelled stream can leave its generator suspended, unfinalised.
        context.add_done_callback(lambda _: req.cancel())
        self.backend.submit(req)
        if log_it:
            # The user's own words: the prompt, or a chat's last user turn (the turns travel along).
            said = request.prompt or next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            self.prompt_log.record(identity, "api", self.backend.version, said, messages or ())
        return req, events

    async def _start(self, request, context, stream: bool):
        identity = await self.auth.require_aio(context, "user", open_to_anonymous=True)
        try:
            return self._build(request, context, stream, identity)
        except StatusError as err:
            await abort(context, err)

    @staticmethod
    async def _next(events: asyncio.Queue, context):
        """The request's next event; a Failed aborts the call with its status."""
        event = await events.get()
        if isinstance(event, Failed):
            await abort(context, event.error)
        return event

    # --- RPCs ---------------------------------------------------------------
    async def Generate(self, request, context):
        await self.calls.admit(context)
        _, events = await self._start(request, context, stream=False)
        samples = {}
        while not isinstance(event := await self._next(events, context), Finished):
            if isinstance(event, SampleDone):
                samples[event.sample.index] = event.sample
        return policy_pb2.GenerateResponse(
            samples=[_sample_pb(samples[i]) for i in sorted(samples)],
            model_version=event.version,
            usage=policy_pb2.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens),
            prompt_tokens=[_token_pb(t) for t in event.prefill],
        )

    async def GenerateStream(self, request, context):
        await self.calls.admit(context)
        req, events = await self._start(request, context, stream=True)
        while not isinstance(event := await self._next(events, context), Finished):
            if not isinstance(event, Token):
                continue
            message = policy_pb2.GenerateStreamResponse(
                sample_index=event.sample_index, token=_token_pb(event.token), model_version=event.version
            )
            if event.final is not None:
                message.finish_reason = _FINISH[event.final.finish_reason]
                message.generated_text = event.final.text
                message.usage.prompt_tokens = len(req.prompt_ids)
                message.usage.completion_tokens = event.final.generated_tokens
            yield message

    async def GetModelInfo(self, request, context):
        await self.auth.require_aio(context, "user", open_to_anonymous=True)
        try:
            return common_pb2.ModelInfo(**await asyncio.to_thread(self.backend.model_info))
        except StatusError as err:
            await abort(context, err)

    async def PinVersion(self, request, context):
        identity = await self.auth.require_aio(context, "admin")
        problem = request.version and version_name_problem(request.version)
        if problem:  # before any filesystem call
            await abort(context, StatusError(Status.INVALID_ARGUMENT, problem))
        log_fields(log, logging.INFO, "pin requested", user=identity.user_id, version=request.version)
        try:
            await asyncio.to_thread(self.backend.pin, request.version)  # loads the version: off the loop
            return common_pb2.ModelInfo(**await asyncio.to_thread(self.backend.model_info))
        except StatusError as err:
            await abort(context, err)


def _sample_pb(sample) -> policy_pb2.Sample:
    out = policy_pb2.Sample(
        text=sample.text,
        finish_reason=_FINISH[sample.finish_reason],
        generated_tokens=sample.generated_tokens,
        tokens=[_token_pb(t) for t in sample.tokens],
    )
    if sample.seed is not None:
        out.seed = sample.seed
    return out


def _token_pb(t) -> policy_pb2.Token:
    return policy_pb2.Token(id=t.id, text=t.text, logprob=t.logprob or 0.0, special=t.special)


@dataclass
class PolicyHandle:
    grpc_server: AioRunningServer
    backend: PolicyBackend
    http: object | None
    prompt_log: PromptLog | None = None

    @property
    def port(self) -> int:
        return self.grpc_server.port

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http else None

    @property
    def version(self) -> str:
        return self.backend.version

    def stop(self, grace: float = 0) -> None:
        self.grpc_server.stop(grace)
        self.close()

    def close(self) -> None:
        """Stop what runs beside the gRPC server (after it drained)."""
        if self.http:
            self.http.stop()
        if self.prompt_log:
            self.prompt_log.stop()
        self.backend.stop()


def start(settings: Settings, port: int = 0, http_port: int | None = 0, follow: bool = True) -> PolicyHandle:
    """Load the serving version, start the gRPC server and the HTTP APIs (TGI and OpenAI)."""
    backend: PolicyBackend
    if settings.tgi_url:
        from services.policy.tgi_backend import TgiBackend

        backend = TgiBackend(settings)
        backend.start()
    else:
        backend = LocalBackend(settings)
        backend.start(follow=follow)
    auth = Authenticator.from_settings(settings)
    prompt_log = PromptLog(settings).start() if settings.prompt_log else None
    servicer = PolicyServicer(settings, backend, auth, prompt_log)

    def register(server: grpc.aio.Server) -> str:
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(servicer, server)
        return policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name

    try:
        running = start_aio_server(settings, SERVICE, [register], port, drain=servicer.calls.drain)
    except Exception:
        if prompt_log:
            prompt_log.stop(flush_s=0)
        backend.stop()
        raise
    http = None
    if http_port is not None:
        from services.policy.http_api import HttpServer

        http = HttpServer(settings, backend, http_port, auth, prompt_log).start()
    log_fields(
        log,
        20,
        "policy service ready",
        port=running.port,
        http_port=http.port if http else None,
        version=backend.version,
        backend=backend.name,
    )
    return PolicyHandle(running, backend, http, prompt_log)
