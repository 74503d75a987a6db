"""The playground's one way to talk to the platform: PolicyService for text,
FeedbackService for everything that is recorded.

Both front ends (the web backend in `app.py` and the terminal in `cli.py`)
go through `PlaygroundClient`, so a prompt is logged, a ranking is encoded
and an error is reported the same way in both.

The caller's bearer token is forwarded as gRPC metadata on every
FeedbackService call; the feedback service, not the playground, decides who
may submit what. The playground checks only what is its own rule: labelers
rank K = 4..9 samples per prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import grpc
from rlhf.v1 import common_pb2, events_pb2, feedback_pb2, feedback_pb2_grpc, policy_pb2, policy_pb2_grpc

from services.common.auth import bearer
from services.common.config import Settings
from services.common.grpc_server import channel_options
from services.common.logs import get_logger, log_fields
from services.feedback import VALIDATE_FIRST
from services.policy.prompt_log import LOG_HEADER

log = get_logger(__name__)

# InstructGPT's labelers ranked between 4 and 9 responses per prompt.
MIN_K, MAX_K = 4, 9
LIKERT_MIN, LIKERT_MAX = 1, 7
SOURCE = "playground"
# Generous deadlines: a CPU policy may queue a while before it decodes.
GENERATE_TIMEOUT_S = 300.0
SUBMIT_TIMEOUT_S = 30.0
FLAG_NAMES = [name for name in events_pb2.LabelFlag.keys() if name != "LABEL_FLAG_UNSPECIFIED"]


class PlaygroundError(Exception):
    """A request the playground refuses or a service refused.

    `code` is a grpc.StatusCode, so both kinds map to HTTP and to the
    terminal the same way; `message` is shown to the person verbatim.
    """

    def __init__(self, code: grpc.StatusCode, message: str, service: str = "playground"):
        super().__init__(message)
        self.code = code
        self.message = message
        self.service = service

    @classmethod
    def from_rpc(cls, err: grpc.RpcError, service: str) -> PlaygroundError:
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        return cls(code or grpc.StatusCode.UNKNOWN, details or (code.name if code else "unknown error"), service)

    def __str__(self) -> str:
        return f"{self.service}: {self.code.name}: {self.message}"


def flag_label(name: str) -> str:
    """LABEL_FLAG_HARMFUL_ADVICE -> 'Harmful advice'."""
    return name.removeprefix("LABEL_FLAG_").replace("_", " ").capitalize()


def ranks_from_groups(groups: Sequence[Sequence[int]], k: int) -> list[int]:
    """Turn a best-first list of tie groups over sample indices 0..k-1 into a
    rank per sample (1 = best, tied samples share a rank, dense ranks).

    Samples absent from every group get rank 0 ("unranked"); the feedback
    service rejects such a ranking and its message is shown to the labeler.
    """
    ranks = [0] * k
    for rank, group in enumerate(groups, start=1):
        for index in group:
            ranks[index] = rank
    return ranks


def request_id_for(*parts: str) -> str:
    """A stable idempotency key: the same submission retried gets the same id."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


@dataclass
class GenerationOptions:
    max_new_tokens: int = 0  # 0: the server's default
    temperature: float | None = None  # None: the server's default
    top_p: float | None = None
    seed: int | None = None

    def to_proto(self, num_samples: int = 1) -> policy_pb2.GenerationParameters:
        params = policy_pb2.GenerationParameters(max_new_tokens=self.max_new_tokens, num_samples=num_samples)
        if self.temperature is not None:
            params.temperature = self.temperature
        if self.top_p is not None:
            params.top_p = self.top_p
        if self.seed is not None:
            params.seed = self.seed
        return params


@dataclass
class Samples:
    prompt_event_id: str
    model_version: str
    texts: list[str]
    finish_reasons: list[str] = field(default_factory=list)


def _messages(messages: Iterable[dict] | None) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages or []]


def reply_dict(reply: feedback_pb2.SubmitReply) -> dict:
    return {
        "event_id": reply.event_id,
        "duplicate": reply.duplicate,
        "topic": reply.topic,
        "partition": reply.partition,
        "offset": reply.offset,
    }


class PlaygroundClient:
    """gRPC stubs for the policy and feedback services, plus the playground's rules."""

    def __init__(self, settings: Settings):
        self.settings = settings
        options = channel_options(settings)
        self._policy_channel = grpc.insecure_channel(settings.policy_target, options=options)
        self._feedback_channel = grpc.insecure_channel(settings.feedback_target, options=options)
        self.policy = policy_pb2_grpc.PolicyServiceStub(self._policy_channel)
        self.feedback = feedback_pb2_grpc.FeedbackServiceStub(self._feedback_channel)

    def close(self) -> None:
        self._policy_channel.close()
        self._feedback_channel.close()

    # --- policy ----------------------------------------------------------------
    @staticmethod
    def _policy_metadata(token: str) -> list[tuple[str, str]]:
        """The caller's token; the playground logs its prompts itself (LogPrompt), so the policy does not."""
        return [*bearer(token), (LOG_HEADER, "false")]

    def model_info(self, token: str) -> common_pb2.ModelInfo:
        try:
            return self.policy.GetModelInfo(
                common_pb2.GetModelInfoRequest(), metadata=self._policy_metadata(token), timeout=SUBMIT_TIMEOUT_S
            )
        except grpc.RpcError as err:
            raise PlaygroundError.from_rpc(err, "policy") from None

    def stream(
        self, token: str, prompt: str = "", messages: list[dict] | None = None, options: GenerationOptions | None = None
    ):
        """Start GenerateStream; return the call (iterate it for tokens, cancel() to stop).

        Iterating raises grpc.RpcError; `next_or_error` converts it.
        """
        request = policy_pb2.GenerateRequest(
            prompt=prompt, messages=_messages(messages), parameters=(options or GenerationOptions()).to_proto(1)
        )
        return self.policy.GenerateStream(request, metadata=self._policy_metadata(token), timeout=GENERATE_TIMEOUT_S)

    def samples(
        self, token: str, prompt: str, k: int, options: GenerationOptions | None = None, request_id: str = ""
    ) -> Samples:
        """Log the prompt, then ask the policy for K samples to rank."""
        check_k(k)
        logged = self.log_prompt(token, prompt=prompt, mode="label", request_id=request_id)
        request = policy_pb2.GenerateRequest(prompt=prompt, parameters=(options or GenerationOptions()).to_proto(k))
        try:
            reply = self.policy.Generate(request, metadata=self._policy_metadata(token), timeout=GENERATE_TIMEOUT_S)
        except grpc.RpcError as err:
            raise PlaygroundError.from_rpc(err, "policy") from None
        if len(reply.samples) != k:
            raise PlaygroundError(
                grpc.StatusCode.INTERNAL, f"asked the policy for {k} samples, got {len(reply.samples)}", "policy"
            )
        return Samples(
            prompt_event_id=logged["event_id"],
            model_version=reply.model_version,
            texts=[s.text for s in reply.samples],
            finish_reasons=[policy_pb2.FinishReason.Name(s.finish_reason) for s in reply.samples],
        )

    # --- feedback --------------------------------------------------------------
    def _submit(self, method: str, request, token: str) -> dict:
        try:
            reply = getattr(self.feedback, method)(request, metadata=bearer(token), timeout=SUBMIT_TIMEOUT_S)
        except grpc.RpcError as err:
            error = PlaygroundError.from_rpc(err, "feedback")
            log_fields(
                log, 20, "feedback refused a submission", method=method, code=error.code.name, error=error.message
            )
            raise error from None
        log_fields(log, 20, "submitted", method=method, event_id=reply.event_id, duplicate=reply.duplicate)
        return reply_dict(reply)

    def log_prompt(
        self, token: str, prompt: str = "", messages: list[dict] | None = None, mode: str = "chat", request_id: str = ""
    ) -> dict:
        request = feedback_pb2.LogPromptRequest(
            request_id=request_id or new_request_id(),
            text=prompt,
            messages=_messages(messages),
            source=SOURCE,
            metadata={"mode": mode},
        )
        return self._submit("LogPrompt", request, token)

    # One RPC each (the CLI submits as the labeler goes); arguments as the *_request builders below.
    def submit_comparison(self, token: str, *args, **kwargs) -> dict:
        return self._submit("SubmitComparison", comparison_request(*args, **kwargs), token)

    def submit_labels(self, token: str, *args, **kwargs) -> dict:
        return self._submit("SubmitLabels", labels_request(*args, **kwargs), token)

    def submit_demonstration(self, token: str, *args, **kwargs) -> dict:
        return self._submit("SubmitDemonstration", demonstration_request(*args, **kwargs), token)

    def submit_together(self, token: str, items: Sequence[feedback_pb2.BulkItem]) -> list[dict]:
        """One labeling submission (ranking, labels, demonstration) as one
        validate-first BulkSubmit: a bad item writes none of them."""
        try:
            replies = list(
                self.feedback.BulkSubmit(
                    iter(items), metadata=[*bearer(token), VALIDATE_FIRST], timeout=SUBMIT_TIMEOUT_S
                )
            )
        except grpc.RpcError as err:
            error = PlaygroundError.from_rpc(err, "feedback")
            log_fields(
                log, 20, "feedback refused a submission", method="BulkSubmit", code=error.code.name, error=error.message
            )
            raise error from None
        log_fields(log, 20, "submitted", method="BulkSubmit", event_ids=[r.event_id for r in replies])
        return [reply_dict(r) for r in replies]


def comparison_request(
    request_id: str,
    prompt_text: str,
    texts: Sequence[str],
    ranks: Sequence[int],
    policy_version: str | Sequence[str],
    prompt_id: str = "",
) -> feedback_pb2.SubmitComparisonRequest:
    versions = [policy_version] * len(texts) if isinstance(policy_version, str) else list(policy_version)
    return feedback_pb2.SubmitComparisonRequest(
        request_id=request_id,
        prompt_id=prompt_id,
        prompt_text=prompt_text,
        responses=[
            events_pb2.RankedResponse(text=t, policy_version=v, rank=r) for t, v, r in zip(texts, versions, ranks)
        ],
    )


def labels_request(
    request_id: str,
    prompt_text: str,
    response: str,
    policy_version: str,
    likert: int = 0,
    flags: Sequence[str] = (),
    prompt_id: str = "",
) -> feedback_pb2.SubmitLabelsRequest:
    unknown = [f for f in flags if f not in FLAG_NAMES]
    if unknown:
        raise PlaygroundError(
            grpc.StatusCode.INVALID_ARGUMENT, f"flags: unknown flag {unknown[0]!r}; known: {', '.join(FLAG_NAMES)}"
        )
    return feedback_pb2.SubmitLabelsRequest(
        request_id=request_id,
        prompt_id=prompt_id,
        prompt_text=prompt_text,
        response=response,
        policy_version=policy_version,
        likert=likert,
        flags=[events_pb2.LabelFlag.Value(f) for f in flags],
    )


def demonstration_request(
    request_id: str, prompt_text: str, response: str, prompt_id: str = ""
) -> feedback_pb2.SubmitDemonstrationRequest:
    return feedback_pb2.SubmitDemonstrationRequest(
        request_id=request_id, prompt_id=prompt_id, prompt_text=prompt_text, response=response
    )


def check_k(k: int) -> None:
    if not MIN_K <= k <= MAX_K:
        raise PlaygroundError(
            grpc.StatusCode.INVALID_ARGUMENT, f"k (num_samples) must be between {MIN_K} and {MAX_K}, got {k}"
        )


def new_request_id() -> str:
    import uuid

    return uuid.uuid4().hex


def next_or_error(call) -> policy_pb2.GenerateStreamResponse | None:
    """The next streamed message, None at the end; service errors become PlaygroundError."""
    try:
        return next(call)
    except StopIteration:
        return None
    except grpc.RpcError as err:
        raise PlaygroundError.from_rpc(err, "policy") from None
