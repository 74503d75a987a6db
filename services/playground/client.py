"""The playground's one way to talk to the platform: PolicyService for text,
FeedbackService for logged prompts, LabelingService for the labeling queue.

Both front ends (the web backend in `app.py` and the terminal in `cli.py`)
go through `PlaygroundClient`, so a prompt is logged, a task is submitted and
an error is reported the same way in both.

The caller's bearer token is forwarded as gRPC metadata on every call; the
services, not the playground, decide who may do what. A labeler's work on a
task travels as one value: a list of `Judgement`s (sample, Likert, flags,
rank), submitted with `SubmitTask` all or nothing.

Refusals are `services.common.errors.StatusError`s; `service_of(err)` names
the service that refused ("playground" for the playground's own checks).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc
from rlhf.v1 import (
    common_pb2,
    events_pb2,
    feedback_pb2,
    feedback_pb2_grpc,
    labeling_pb2,
    labeling_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
)

from services.common.auth import bearer
from services.common.config import Settings
from services.common.errors import StatusError, invalid, status_of_grpc
from services.common.feedback import MAX_LIKERT, MIN_LIKERT
from services.common.grpc_server import channel_options
from services.common.logs import get_logger, log_fields
from services.policy.prompt_log import LOG_HEADER

log = get_logger(__name__)

LIKERT_MIN, LIKERT_MAX = MIN_LIKERT, MAX_LIKERT
SOURCE = "playground"
# Generous deadlines: a CPU policy may queue a while before it decodes.
GENERATE_TIMEOUT_S = 300.0
SUBMIT_TIMEOUT_S = 30.0
FLAG_NAMES = [name for name in events_pb2.LabelFlag.keys() if name != "LABEL_FLAG_UNSPECIFIED"]
TASK_KINDS = {labeling_pb2.TASK_KIND_DEMONSTRATION: "demonstration", labeling_pb2.TASK_KIND_COMPARISON: "comparison"}


def rpc_error(err: grpc.RpcError, service: str) -> StatusError:
    """A service's refusal as a StatusError that remembers which service refused."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    out = StatusError(status_of_grpc(code), details or (code.name if code else "unknown error"))
    out.service = service
    return out


def service_of(err: StatusError) -> str:
    return getattr(err, "service", "playground")


def describe(err: StatusError) -> str:
    """'labeling service: INVALID_ARGUMENT: judgements[1].likert: ...' (or 'playground: ...')."""
    who = service_of(err)
    return f"{who if who == 'playground' else who + ' service'}: {err.status.name}: {err.message}"


def flag_label(name: str) -> str:
    """LABEL_FLAG_HARMFUL_ADVICE -> 'Harmful advice'."""
    return name.removeprefix("LABEL_FLAG_").replace("_", " ").capitalize()


def ranks_from_groups(groups: Sequence[Sequence[int]], k: int) -> list[int]:
    """Turn a best-first list of tie groups over sample indices 0..k-1 into a
    rank per sample (1 = best, tied samples share a rank, dense ranks).

    Samples absent from every group get rank 0 ("unranked"); the labeling
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


@dataclass(frozen=True)
class Judgement:
    """A labeler's judgement of one sample of a comparison task: the value that
    travels from the page (or the terminal) to the LabelingService."""

    sample_id: str
    likert: int
    rank: int  # 1 = best; equal ranks are ties
    flags: tuple[str, ...] = ()  # LabelFlag names, e.g. "LABEL_FLAG_HALLUCINATION"

    def to_proto(self, index: int) -> labeling_pb2.SampleJudgement:
        unknown = [f for f in self.flags if f not in FLAG_NAMES]
        if unknown:
            raise invalid(f"judgements[{index}].flags: unknown flag {unknown[0]!r}; known: {', '.join(FLAG_NAMES)}")
        return labeling_pb2.SampleJudgement(
            sample_id=self.sample_id,
            likert=self.likert,
            rank=self.rank,
            flags=[events_pb2.LabelFlag.Value(f) for f in self.flags],
        )


@dataclass(frozen=True)
class TaskSample:
    sample_id: str
    text: str


@dataclass(frozen=True)
class Task:
    task_id: str
    kind: str  # "demonstration" | "comparison"
    prompt_id: str
    prompt_text: str
    samples: tuple[TaskSample, ...]
    lease_expires_unix_ms: int

    @classmethod
    def from_proto(cls, task: labeling_pb2.Task) -> Task:
        return cls(
            task.task_id,
            TASK_KINDS.get(task.kind, "comparison"),
            task.prompt_id,
            task.prompt_text,
            tuple(TaskSample(s.sample_id, s.text) for s in task.samples),
            task.lease_expires_unix_ms,
        )

    def as_dict(self) -> dict:
        return {
            "task_id": self.task_id,
            "kind": self.kind,
            "prompt_id": self.prompt_id,
            "prompt_text": self.prompt_text,
            "samples": [{"sample_id": s.sample_id, "text": s.text} for s in self.samples],
            "lease_expires_unix_ms": self.lease_expires_unix_ms,
        }


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
    """gRPC stubs for the policy, feedback and labeling services."""

    def __init__(self, settings: Settings):
        self.settings = settings
        options = channel_options(settings)
        self._channels = [
            grpc.insecure_channel(target, options=options)
            for target in (settings.policy_target, settings.feedback_target, settings.labeling_target)
        ]
        self.policy = policy_pb2_grpc.PolicyServiceStub(self._channels[0])
        self.feedback = feedback_pb2_grpc.FeedbackServiceStub(self._channels[1])
        self.labeling = labeling_pb2_grpc.LabelingServiceStub(self._channels[2])

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    @staticmethod
    def _call(service: str, method, request, token: str, timeout: float = SUBMIT_TIMEOUT_S):
        try:
            return method(request, metadata=bearer(token) if token else None, timeout=timeout)
        except grpc.RpcError as err:
            error = rpc_error(err, service)
            log_fields(
                log,
                logging.INFO,
                "a service refused a call",
                service=service,
                code=error.status.name,
                error=error.message,
            )
            raise error from None

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
            raise rpc_error(err, "policy") from None

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

    # --- feedback --------------------------------------------------------------
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
        reply = self._call("feedback", self.feedback.LogPrompt, request, token)
        log_fields(log, logging.INFO, "prompt logged", event_id=reply.event_id, duplicate=reply.duplicate)
        return reply_dict(reply)

    # --- labeling ----------------------------------------------------------------
    def next_task(self, token: str) -> Task:
        """Lease the next task (the same one while a lease is open); NOT_FOUND when the queue is empty."""
        return Task.from_proto(self._call("labeling", self.labeling.NextTask, labeling_pb2.NextTaskRequest(), token))

    def submit_task(
        self, token: str, task_id: str, *, judgements: Sequence[Judgement] = (), demonstration: str = ""
    ) -> dict:
        """Submit a leased task: a demonstration, or a judgement of every sample. All or nothing."""
        request = labeling_pb2.SubmitTaskRequest(
            task_id=task_id,
            demonstration=demonstration,
            judgements=[j.to_proto(i) for i, j in enumerate(judgements)],
        )
        reply = self._call("labeling", self.labeling.SubmitTask, request, token)
        log_fields(
            log, logging.INFO, "task submitted", task_id=task_id, event_id=reply.event_id, duplicate=reply.duplicate
        )
        return {"task_id": reply.task_id, "event_id": reply.event_id, "duplicate": reply.duplicate}

    def stats(self, token: str) -> labeling_pb2.LabelingStats:
        return self._call("labeling", self.labeling.GetStats, labeling_pb2.GetStatsRequest(), token)


def new_request_id() -> str:
    import uuid

    return uuid.uuid4().hex


def next_or_error(call) -> policy_pb2.GenerateStreamResponse | None:
    """The next streamed message, None at the end; service errors become StatusError."""
    try:
        return next(call)
    except StopIteration:
        return None
    except grpc.RpcError as err:
        raise rpc_error(err, "policy") from None
