"""The RewardService: one scalar per response from the serving reward model,
with cross-request batching and checkpoint hot-swap.

A response's score is read at its last real token, EOS included
(`encode_prompt_response` appends EOS; `RewardModel.score` finds the last
real token from the attention mask and takes position ids from the mask), so
a score never depends on padding side or on which other responses share its
batch.

One scorer thread drains a bounded queue of requests and runs forward passes
of up to RLHF_REWARD_BATCH sequences, mixing responses of different requests
that were accepted on the same model version. A request is bound to the
version serving when it arrived, so a hot swap never splits a request across
versions; the response names that version.

Every call but health is authenticated: Score and GetModelInfo need a bearer
token of role `user`, PinVersion `admin`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from rlhf.v1 import common_pb2, reward_pb2, reward_pb2_grpc

from services.common import openmp
from services.common.auth import Authenticator
from services.common.checkpoints import Manifest, version_name_problem
from services.common.config import Settings
from services.common.dtypes import resolve_dtype
from services.common.errors import Status, StatusError, abort, grpc_code, invalid
from services.common.grpc_server import RunningServer, start_server
from services.common.hotswap import Loaded, ModelSwitcher
from services.common.logs import get_logger, log_fields
from services.common.metrics import BATCH_SIZE, QUEUE_DEPTH
from services.common.models import RewardModel, encode_prompt_response, pad_batch, render_prompt, resolve_device

log = get_logger(__name__)

SERVICE = "reward"
CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class _Job:
    loaded: Loaded
    sequences: list[list[int]]
    deadline: float | None
    scores: list[float | None] = field(default_factory=list)
    error: StatusError | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.scores = [None] * len(self.sequences)


def score_sequences(model: RewardModel, sequences: list[list[int]], pad_id: int, side: str = "right") -> list[float]:
    """Score token sequences in one padded forward pass (any padding side)."""
    ids, mask = pad_batch(sequences, pad_id, side=side)
    device = next(model.parameters()).device
    with torch.inference_mode():
        return model.score(ids.to(device), mask.to(device)).float().cpu().tolist()


class Scorer:
    """The batching loop: a bounded queue of jobs, forward passes of <= RLHF_REWARD_BATCH."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._cv = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._stopping = False
        self.forward_passes = 0
        self._thread = threading.Thread(target=self._run, name="reward-scorer", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> None:
        with self._cv:
            if self._stopping:
                raise StatusError(Status.UNAVAILABLE, "the reward service is shutting down")
            if len(self._jobs) >= self.settings.max_queue:
                raise StatusError(
                    Status.RESOURCE_EXHAUSTED,
                    f"the scoring queue is full ({self.settings.max_queue} waiting, RLHF_MAX_QUEUE); retry later",
                )
            self._jobs.append(job)
            QUEUE_DEPTH.labels(SERVICE).set(len(self._jobs))
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        for job in self._jobs:
            job.error = StatusError(Status.UNAVAILABLE, "the reward service is shutting down")
            job.done.set()

    def _take(self) -> list[_Job]:
        """All waiting jobs of the oldest job's version, up to a batch of sequences
        (at least one whole job, so a large request still makes progress)."""
        with self._cv:
            while not self._jobs and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return []
            first = self._jobs[0]
            taken, size = [], 0
            for job in list(self._jobs):
                if job.loaded is not first.loaded:
                    continue
                if taken and size + len(job.sequences) > self.settings.reward_batch:
                    break
                taken.append(job)
                size += len(job.sequences)
                self._jobs.remove(job)
            QUEUE_DEPTH.labels(SERVICE).set(len(self._jobs))
            return taken

    def _run(self) -> None:
        openmp.compute_thread(self.settings.torch_threads)  # this process's one OpenMP pool
        while True:
            jobs = self._take()
            if not jobs:
                return
            now = time.monotonic()
            live = []
            for job in jobs:
                if job.deadline is not None and now >= job.deadline:
                    job.error = StatusError(Status.DEADLINE_EXCEEDED, "deadline exceeded while queued")
                    job.done.set()
                else:
                    live.append(job)
            try:
                self._score(live)
            except Exception as err:
                log.exception("scoring failed", extra={"fields": {"error": str(err)}})
                for job in live:
                    job.error = StatusError(Status.INTERNAL, f"scoring failed: {err}")
            for job in live:
                job.done.set()

    def _score(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        loaded = jobs[0].loaded
        items = [(job, i, seq) for job in jobs for i, seq in enumerate(job.sequences)]
        items.sort(key=lambda item: len(item[2]))  # similar lengths together: less padding
        step = self.settings.reward_batch
        for start in range(0, len(items), step):
            chunk = items[start : start + step]
            scores = score_sequences(loaded.model, [seq for _, _, seq in chunk], loaded.tokenizer.pad_token_id)
            self.forward_passes += 1
            BATCH_SIZE.labels(SERVICE).observe(len(chunk))
            for (job, i, _), value in zip(chunk, scores, strict=True):
                job.scores[i] = value


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, settings: Settings, switcher: ModelSwitcher, scorer: Scorer, auth: Authenticator):
        self.settings = settings
        self.switcher = switcher
        self.scorer = scorer
        self.auth = auth

    def _job(self, request: reward_pb2.ScoreRequest, context: grpc.ServicerContext) -> _Job:
        s = self.settings
        if not request.responses:
            raise invalid("responses is empty; send at least one response")
        if len(request.responses) > s.reward_max_responses:
            raise invalid(
                f"responses has {len(request.responses)} entries; "
                f"the limit is {s.reward_max_responses} (RLHF_REWARD_MAX_RESPONSES)",
            )
        messages = None
        if request.messages:
            for i, m in enumerate(request.messages):
                if m.role not in CHAT_ROLES:
                    raise invalid(
                        f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}; got {m.role!r}",
                    )
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
        elif not request.prompt.strip():
            raise invalid("prompt is empty (set prompt or messages)")
        loaded = self.switcher.current  # the whole request is scored by this version
        prompt_text = render_prompt(loaded.tokenizer, request.prompt, messages)
        max_tokens = s.max_prompt_tokens + s.max_new_tokens_limit
        sequences = [encode_prompt_response(loaded.tokenizer, prompt_text, r, max_tokens) for r in request.responses]
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None and remaining < 1e8 else None
        return _Job(loaded, sequences, deadline)

    def Score(self, request, context):
        self.auth.require(context, "user")
        try:
            job = self._job(request, context)
            self.scorer.submit(job)
        except StatusError as err:
            abort(context, err)
        job.done.wait()
        if job.error is not None:
            abort(context, job.error)
        return reward_pb2.ScoreResponse(scores=job.scores, model_version=job.loaded.version)

    def GetModelInfo(self, request, context):
        self.auth.require(context, "user")
        return common_pb2.ModelInfo(**self.switcher.model_info("local"))

    def PinVersion(self, request, context):
        identity = self.auth.require(context, "admin")
        problem = request.version and version_name_problem(request.version)
        if problem:  # before any filesystem call
            context.abort(grpc_code(Status.INVALID_ARGUMENT), problem)
        log_fields(log, logging.INFO, "pin requested", user=identity.user_id, version=request.version)
        try:
            self.switcher.pin(request.version)
        except StatusError as err:
            abort(context, err)
        return common_pb2.ModelInfo(**self.switcher.model_info("local"))


@dataclass
class RewardHandle:
    grpc_server: RunningServer
    switcher: ModelSwitcher
    scorer: Scorer

    @property
    def port(self) -> int:
        return self.grpc_server.port

    @property
    def version(self) -> str:
        return self.switcher.current.version

    def stop(self, grace: float = 0) -> None:
        self.grpc_server.stop(grace)
        self.close()

    def close(self) -> None:
        self.switcher.stop()
        self.scorer.stop()


def start(settings: Settings, port: int = 0, follow: bool = True) -> RewardHandle:
    """Load the serving reward model and start the gRPC server."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.serve_dtype, device)[0]

    def load(path: Path, manifest: Manifest) -> RewardModel:
        return RewardModel.from_pretrained(path, device=device, dtype=dtype)

    def warmup(loaded: Loaded) -> None:
        ids = loaded.tokenizer("Hello", add_special_tokens=False).input_ids + [loaded.tokenizer.eos_token_id]
        score_sequences(loaded.model, [ids], loaded.tokenizer.pad_token_id)

    scorer = Scorer(settings)
    switcher = ModelSwitcher(settings, "reward", SERVICE, load, warmup)
    try:
        switcher.start(follow=follow)
        servicer = RewardServicer(settings, switcher, scorer, Authenticator.from_settings(settings))

        def register(server: grpc.Server) -> str:
            reward_pb2_grpc.add_RewardServiceServicer_to_server(servicer, server)
            return reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name

        running = start_server(settings, SERVICE, [register], port)
    except Exception:
        switcher.stop()
        scorer.stop()
        raise
    log_fields(log, logging.INFO, "reward service ready", port=running.port, version=switcher.current.version)
    return RewardHandle(running, switcher, scorer)
