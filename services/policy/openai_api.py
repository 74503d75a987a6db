"""The OpenAI-compatible routes of the policy's HTTP API (same port as the TGI
routes; services/policy/http_api.py holds the shared authentication,
submission and event reading):

  POST /v1/chat/completions   JSON, or server-sent `chat.completion.chunk`s
                              ending with `data: [DONE]` when "stream": true
  POST /v1/completions        the same for raw text (`text_completion`)
  GET  /v1/models, /v1/models/{id}

Parameters: n (K samples, each seeded seed+i), max_tokens (chat also
max_completion_tokens), temperature (0 = greedy), top_p, stop, seed,
logprobs (chat: true/false; completions: 0) and stream_options.include_usage;
`store: false` keeps the prompt out of the training data. top_logprobs > 0
(completions: logprobs > 0) is refused: the engine reports the sampled
token's logprob only. Parameters we cannot honour (penalties, logit_bias,
tools, JSON mode, echo, best_of, suffix) are refused by name rather than
silently ignored. `user` is ignored: a prompt is attributed to the token.

Every response carries `usage` and names the serving version in `model`. A
stream without stream_options.include_usage carries `usage` on its last
chunk; with it, on an extra chunk with no choices, as OpenAI does. `model` in
a request must be the serving version or the alias "policy" (404
model_not_found otherwise). Errors use OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, with OpenAI's statuses
(400 for a bad request, where the TGI routes answer 422).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from services.common.errors import Status, StatusError
from services.common.feedback import CHAT_ROLES
from services.common.models import render_prompt
from services.common.streaming import StreamUntilEnd
from services.policy.http_api import Gateway, number, version_or_empty
from services.policy.params import FINISH_LENGTH, SampleOut, TokenOut, validate

MODEL_ALIAS = "policy"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
# Parameters we cannot honour, and the value that means "off" for each.
_REFUSED = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "prediction": (None,),
    "audio": (None,),
}
# (HTTP status, OpenAI error type, code) per outcome.
_ERRORS = {
    Status.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    Status.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    Status.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    Status.PERMISSION_DENIED: (403, "permission_error", "insufficient_permissions"),
    Status.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    Status.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    Status.UNAVAILABLE: (503, "server_error", "service_unavailable"),
    Status.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
}


class OpenAIError(StatusError):
    """A StatusError with OpenAI's `param` and `code` fields."""

    def __init__(self, status: Status, message: str, param: str | None = None, code: str | None = None):
        super().__init__(status, message)
        self.param, self.code = param, code


def _error_body(err: StatusError) -> tuple[int, dict]:
    status, kind, code = _ERRORS.get(err.status, (err.status.http, "server_error", None))
    return status, {
        "error": {
            "message": err.message,
            "type": kind,
            "param": getattr(err, "param", None),
            "code": getattr(err, "code", None) or code,
        }
    }


def error_response(err: StatusError, version: str = "", http_status: int | None = None) -> JSONResponse:
    status, body = _error_body(err)
    return JSONResponse(body, status_code=http_status or status, headers={"x-model-version": version})


def _refuse_unsupported(body: dict) -> None:
    for name, off in _REFUSED.items():
        if name in body and body[name] not in off:
            raise OpenAIError(Status.INVALID_ARGUMENT, f"`{name}` is not supported by this server", param=name)
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise OpenAIError(
            Status.INVALID_ARGUMENT, "`response_format` other than {'type': 'text'} is not supported", "response_format"
        )


def _chat_messages(raw: Any) -> list[dict]:
    """OpenAI chat messages as our {role, content} turns ("developer" is OpenAI's new name for "system")."""
    if not isinstance(raw, list) or not raw:
        raise OpenAIError(Status.INVALID_ARGUMENT, "`messages` must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise OpenAIError(Status.INVALID_ARGUMENT, f"`messages[{i}]` must be an object", f"messages[{i}]")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in CHAT_ROLES:
            raise OpenAIError(
                Status.INVALID_ARGUMENT,
                f"`messages[{i}].role` must be one of {', '.join(CHAT_ROLES)} or developer; got {m.get('role')!r}",
                f"messages[{i}].role",
            )
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise OpenAIError(
                    Status.INVALID_ARGUMENT,
                    f"`messages[{i}].content`: only text parts are supported",
                    f"messages[{i}].content",
                )
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise OpenAIError(
                Status.INVALID_ARGUMENT, f"`messages[{i}].content` must be a string", f"messages[{i}].content"
            )
        out.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in out):
        raise OpenAIError(Status.INVALID_ARGUMENT, "`messages`: every message content is empty", "messages")
    return out


class _OpenAIRequest:
    """A chat or completions body turned into the engine's validated form."""

    def __init__(self, gateway: Gateway, body: Any, chat: bool):
        if not isinstance(body, dict):
            raise OpenAIError(Status.INVALID_ARGUMENT, "the body must be a JSON object")
        _refuse_unsupported(body)
        self.chat = chat
        self.model = body.get("model")
        version = gateway.backend.version
        if self.model is not None and self.model not in (version, MODEL_ALIAS):
            raise OpenAIError(
                Status.NOT_FOUND,
                f"The model `{self.model}` does not exist; this server serves `{version}` (alias `{MODEL_ALIAS}`)",
                "model",
                "model_not_found",
            )
        if chat:
            self.messages: list[dict] | None = _chat_messages(body.get("messages"))
            self.prompt_text = render_prompt(gateway.backend.tokenizer, "", self.messages)
            self.user_text = next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise OpenAIError(
                    Status.INVALID_ARGUMENT, "`prompt` must be a non-empty string (one prompt per request)", "prompt"
                )
            self.messages, self.prompt_text, self.user_text = None, prompt, prompt

        n = number(body, "n", int)
        max_tokens = number(body, "max_completion_tokens", int) if chat else None
        max_tokens = max_tokens if max_tokens is not None else number(body, "max_tokens", int)
        if max_tokens is None and not chat:
            max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
        if max_tokens is not None and max_tokens < 1:
            raise OpenAIError(
                Status.INVALID_ARGUMENT, f"`max_tokens` must be at least 1; got {max_tokens}", "max_tokens"
            )
        temperature = number(body, "temperature")
        if temperature is not None and not 0.0 <= temperature <= MAX_TEMPERATURE:
            raise OpenAIError(
                Status.INVALID_ARGUMENT,
                f"`temperature` must be between 0 and {MAX_TEMPERATURE:g}; got {temperature}",
                "temperature",
            )
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
            raise OpenAIError(Status.INVALID_ARGUMENT, "`stop` must be a string or a list of strings", "stop")
        self.logprobs = self._logprobs(body, chat)
        self.stream = bool(body.get("stream"))
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise OpenAIError(Status.INVALID_ARGUMENT, "`stream_options` must be an object", "stream_options")
        self.include_usage = bool(options.get("include_usage"))
        store = body.get("store")
        if store is not None and not isinstance(store, bool):
            raise OpenAIError(Status.INVALID_ARGUMENT, "`store` must be true or false", "store")
        self.store = store
        try:
            self.params = validate(
                gateway.settings,
                max_new_tokens=max_tokens,
                temperature=temperature,
                top_p=number(body, "top_p"),
                top_k=number(body, "top_k", int),  # vLLM's extensions, accepted alike
                repetition_penalty=number(body, "repetition_penalty"),
                stop=stop,
                seed=number(body, "seed", int),
                num_samples=n,
                return_logprobs=self.logprobs,
            )
        except StatusError as err:
            # validate() names our own fields; say OpenAI's where they differ.
            message = err.message.replace("num_samples", "n").replace("max_new_tokens", "max_tokens")
            field = message.split(" ", 1)[0].strip("`")
            param = field if field in ("n", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed") else None
            raise OpenAIError(Status.INVALID_ARGUMENT, message, param) from None
        self.prompt_ids = gateway.encode(self.prompt_text)

    @staticmethod
    def _logprobs(body: dict, chat: bool) -> bool:
        if chat:
            wanted = body.get("logprobs")
            if wanted is not None and not isinstance(wanted, bool):
                raise OpenAIError(Status.INVALID_ARGUMENT, "`logprobs` must be true or false", "logprobs")
            top = number(body, "top_logprobs", int)
            if top is not None and not 0 <= top <= 20:
                raise OpenAIError(
                    Status.INVALID_ARGUMENT, f"`top_logprobs` must be between 0 and 20; got {top}", "top_logprobs"
                )
            if top and not wanted:
                raise OpenAIError(Status.INVALID_ARGUMENT, "`top_logprobs` requires `logprobs: true`", "top_logprobs")
            if top:
                raise OpenAIError(
                    Status.INVALID_ARGUMENT,
                    "`top_logprobs` > 0 is not supported: this server reports the sampled token's logprob only",
                    "top_logprobs",
                )
            return bool(wanted)
        top = number(body, "logprobs", int)
        if top is not None and not 0 <= top <= 5:
            raise OpenAIError(Status.INVALID_ARGUMENT, f"`logprobs` must be between 0 and 5; got {top}", "logprobs")
        if top:
            raise OpenAIError(
                Status.INVALID_ARGUMENT,
                "`logprobs` > 0 is not supported: this server reports the sampled token's logprob only (use 0)",
                "logprobs",
            )
        return top is not None


def _finish(sample: SampleOut) -> str:
    return "length" if sample.finish_reason == FINISH_LENGTH else "stop"


def _logprob(tok: TokenOut) -> float:
    return tok.logprob if tok.logprob is not None and math.isfinite(tok.logprob) else -9999.0


def _chat_logprobs(tokens: list[TokenOut]) -> dict:
    return {
        "content": [
            {"token": t.text, "logprob": _logprob(t), "bytes": list(t.text.encode()), "top_logprobs": []}
            for t in tokens
            if not t.special
        ],
        "refusal": None,
    }


def _text_logprobs(tokens: list[TokenOut], offset: int = 0) -> dict:
    visible = [t for t in tokens if not t.special]
    offsets, at = [], offset
    for t in visible:
        offsets.append(at)
        at += len(t.text)
    return {
        "tokens": [t.text for t in visible],
        "token_logprobs": [_logprob(t) for t in visible],
        "top_logprobs": None,
        "text_offset": offsets,
    }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def add_routes(app: FastAPI, gateway: Gateway) -> None:
    backend = gateway.backend

    def version() -> str:
        return version_or_empty(backend)

    async def completion(request: Request, chat: bool) -> Response:
        try:
            identity = gateway.identify(request)
            parsed = _OpenAIRequest(gateway, await gateway.read_json(request), chat)
            req, events = gateway.submit(
                request,
                identity,
                "openai",
                parsed.prompt_ids,
                parsed.params,
                parsed.stream,
                parsed.prompt_text,
                parsed.user_text,
                parsed.messages,
                log_default=parsed.store,
            )
            created = int(time.time())
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            if parsed.stream:
                return StreamUntilEnd(
                    _stream(parsed, req, events, rid, created),
                    on_end=req.cancel,
                    media_type="text/event-stream",
                    headers={"x-model-version": version(), "cache-control": "no-cache"},
                )
            done = await gateway.collect(request, req, events)
            if done is None:
                return Response(status_code=499)
            samples, finished = done
        except StatusError as err:
            return error_response(err, version())
        if chat:
            choices = [
                {
                    "index": s.index,
                    "message": {"role": "assistant", "content": s.text, "refusal": None},
                    "logprobs": _chat_logprobs(s.tokens) if parsed.logprobs else None,
                    "finish_reason": _finish(s),
                }
                for s in samples
            ]
        else:
            choices = [
                {
                    "index": s.index,
                    "text": s.text,
                    "logprobs": _text_logprobs(s.tokens) if parsed.logprobs else None,
                    "finish_reason": _finish(s),
                }
                for s in samples
            ]
        body = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": finished.version,
            "system_fingerprint": finished.version,
            "choices": choices,
            "usage": _usage(finished.prompt_tokens, finished.completion_tokens),
        }
        return JSONResponse(body, headers={"x-model-version": finished.version})

    async def _stream(parsed: _OpenAIRequest, req, events, rid: str, created: int):
        """SSE chunks: per choice a role chunk (chat), one chunk per token, a finish
        chunk; then usage (see the module docstring) and `data: [DONE]`."""
        chat, n = parsed.chat, parsed.params.num_samples
        kind = "chat.completion.chunk" if chat else "text_completion"
        finished: dict[int, int] = {}  # sample index -> generated tokens
        offsets = [0] * n
        model = version()

        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            body: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
            body["system_fingerprint"] = model
            if parsed.include_usage or usage is not None:  # with include_usage, OpenAI sends null until the end
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        def choice(index: int, text: str | None, tokens: list[TokenOut], finish: str | None) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                out = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
                if parsed.logprobs and tokens:
                    out["logprobs"] = _chat_logprobs(tokens)
            else:
                out = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
                if parsed.logprobs and tokens:
                    out["logprobs"] = _text_logprobs(tokens, offsets[index])
            return out

        if chat:  # OpenAI opens each choice with the assistant's role
            for i in range(n):
                yield chunk(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
        try:
            async for event in gateway.tokens(events):
                model = event.version
                i, tok = event.sample_index, event.token
                text = "" if tok.special else tok.text
                yield chunk([choice(i, text, [tok], None)])
                offsets[i] += len(text)
                if event.final is not None:
                    finished[i] = event.final.generated_tokens
                    usage = _usage(len(req.prompt_ids), sum(finished.values()))
                    all_done = len(finished) == n
                    closing = choice(i, None, [], _finish(event.final))
                    yield chunk([closing], usage if all_done and not parsed.include_usage else None)
                    if all_done and parsed.include_usage:
                        yield chunk([], usage)
        except StatusError as err:
            _, body = _error_body(err)
            yield f"data: {json.dumps(body)}\n\n"
            return
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await completion(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await completion(request, chat=False)

    def model_card() -> dict:
        info = backend.model_info()
        created = json.loads(info.get("manifest_json") or "{}").get("created_unix_ms", 0) // 1000
        return {"id": info["version"], "object": "model", "created": created, "owned_by": "rlhf-platform"}

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            gateway.identify(request)
            return {"object": "list", "data": [model_card()]}
        except StatusError as err:
            return error_response(err, version())

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        try:
            gateway.identify(request)
            card = model_card()
            if model_id not in (card["id"], MODEL_ALIAS):
                raise OpenAIError(
                    Status.NOT_FOUND, f"The model `{model_id}` does not exist", "model", "model_not_found"
                )
            return card
        except StatusError as err:
            return error_response(err, version())
