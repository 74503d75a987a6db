"""Simulated labelers.

**Through the LabelingService** (`run_labelers`, the front door): each
simulated labeler loops NextTask -> judge -> SubmitTask under its own bearer
token, exactly as a person in the playground does. The service decides which
logged prompt each gets, generates the K samples and writes the events; the
labelers never read Kafka. They judge with noise around the gold preference
(`NoisyLabeler`, noise model in services/sim/README.md), so that two of them
agree on about 73% of response pairs, as InstructGPT's labelers did.

**The older direct pool** (`LabelerPool`) reads the prompts topic and calls
PolicyService and FeedbackService itself, with noise-free gold judgements. It
stays only until the demo and its end-to-end test move to `run_labelers`.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from rlhf.v1 import (
    events_pb2,
    feedback_pb2,
    feedback_pb2_grpc,
    labeling_pb2,
    labeling_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
)
from tqdm import tqdm

from services.common.auth import bearer
from services.common.bus import read_topic
from services.common.config import Settings
from services.common.feedback import MAX_LIKERT, MIN_LIKERT
from services.common.logs import get_logger, log_fields
from services.sim.tasks import gold_ranks, gold_score, write_demonstration
from services.sim.users import Population, SimUser

log = get_logger(__name__)

# --- noisy labelers through the LabelingService ------------------------------------

# Noise sd in gold-rank units; calibrated so that two labelers of this level
# agree on ~73% of response pairs at K = 4.
TEAM_NOISE = 0.88
# Chance per sample of telling apart samples of equal gold score: with two labelers
# that pair is ordered alike (both tie it, or both order it the same) ~73% of the time.
TEAM_SPURIOUS = 0.09
LABELER_SPREAD = 0.25  # sd of log(noise level) across labelers: some are steadier than others
TIE_WITHIN = 0.1  # perceived order scores closer than this (in ranks) are ranked equal
QUALITY_NOISE = 0.1  # gold-score units per unit of rank noise, for the Likert score
SATISFIES, FAILS = 0.8, 0.4  # perceived-score thresholds of the two flags a simulated labeler sets


def dense_ranks(perceived: Sequence[float], tie_within: float) -> list[int]:
    """Rank 1 = best; a score within `tie_within` of the best of the current group ties with it."""
    order = sorted(range(len(perceived)), key=lambda i: -perceived[i])
    ranks, rank, anchor = [0] * len(perceived), 0, None
    for i in order:
        if anchor is None or anchor - perceived[i] >= tie_within:
            rank, anchor = rank + 1, perceived[i]
        ranks[i] = rank
    return ranks


@dataclass(frozen=True)
class NoisyLabeler:
    """A simulated labeler: the gold preference plus Gaussian noise at its own level."""

    user_id: str
    token: str
    noise: float  # sd of the perception noise, as a share of the task's gold spread
    spurious: float  # chance of seeing a difference between two samples of equal gold score, per sample

    def perceive(self, prompt: str, samples: Sequence[labeling_pb2.TaskSample]) -> tuple[list[float], list[float]]:
        """(perceived order scores, perceived quality in [0, 1]) of each sample.

        The order comes from the gold ranking, not from gold magnitudes, so the
        agreement it gives does not depend on how far apart a policy's samples
        happen to score: each sample's gold rank (1 = best, equal gold scores
        share a rank) plus Gaussian noise of sd `noise` ranks. Samples of equal
        gold score stay equal unless this labeler imagines a difference
        (probability `spurious` per sample). Quality is the gold score plus the
        same noise scaled to score units (for Likert and flags). Every draw is
        seeded by labeler and sample id.
        """
        gold = [gold_score(prompt, s.text) for s in samples]
        levels = sorted(set(gold), reverse=True)
        order, quality = [], []
        for g, s in zip(gold, samples, strict=True):
            rng = random.Random(f"{self.user_id}\x00{prompt}\x00{s.text}")
            z = rng.gauss(0.0, 1.0) if gold.count(g) == 1 or rng.random() < self.spurious else 0.0
            order.append(-levels.index(g) + self.noise * z)
            quality.append(g + QUALITY_NOISE * self.noise * z)
        return order, quality

    def judge(self, prompt: str, samples: Sequence[labeling_pb2.TaskSample]) -> list[labeling_pb2.SampleJudgement]:
        order, quality = self.perceive(prompt, samples)
        ranks = dense_ranks(order, TIE_WITHIN)
        out = []
        for s, p, rank in zip(samples, quality, ranks, strict=True):
            likert = min(MAX_LIKERT, max(MIN_LIKERT, round(MIN_LIKERT + (MAX_LIKERT - MIN_LIKERT) * p)))
            flags = [events_pb2.LABEL_FLAG_SATISFIES_CONSTRAINT] if p >= SATISFIES else []
            flags += [events_pb2.LABEL_FLAG_FAILS_TO_FOLLOW_INSTRUCTION] if p < FAILS else []
            out.append(labeling_pb2.SampleJudgement(sample_id=s.sample_id, likert=likert, flags=flags, rank=rank))
        return out


def noisy_team(labelers: Sequence[SimUser], noise: float = TEAM_NOISE, seed: int = 0) -> list[NoisyLabeler]:
    """Each labeler's own noise level: the team's, times a log-normal factor seeded
    by its id; the factors are centred (geometric mean 1) so that a small team is
    as noisy as a large one on average."""
    logs = [random.Random(f"{seed}:{u.user_id}").gauss(0.0, LABELER_SPREAD) for u in labelers]
    centre = sum(logs) / len(logs) if logs else 0.0
    team = []
    for u, log_factor in zip(labelers, logs, strict=True):
        factor = math.exp(log_factor - centre)
        team.append(NoisyLabeler(u.user_id, u.token, noise * factor, min(1.0, TEAM_SPURIOUS * factor)))
    return team


@dataclass
class LabelingRun:
    submitted: int = 0
    demonstrations: int = 0
    comparisons: int = 0
    duplicates: int = 0
    per_labeler: Counter = field(default_factory=Counter)
    seconds: float = 0.0


def run_labelers(
    labeling: grpc.Channel,
    labelers: Sequence[SimUser],
    tasks: int,
    *,
    kind: str = "",
    noise: float = TEAM_NOISE,
    seed: int = 0,
    wait_s: float = 30.0,
    timeout: float = 300.0,
    progress: bool = True,
) -> LabelingRun:
    """N simulated labelers (one thread each) label up to `tasks` tasks in all through the LabelingService.

    `kind` ("demonstration" | "comparison" | "" for the service's mix) asks for
    one kind of task only. A labeler stops when the total is reached, or when
    the queue stayed empty for `wait_s` seconds (NOT_FOUND: no new prompts).
    Other errors propagate.
    """
    if not labelers:
        raise ValueError("run_labelers needs at least one labeler")
    stub = labeling_pb2_grpc.LabelingServiceStub(labeling)
    team = noisy_team(labelers, noise, seed)
    request = labeling_pb2.NextTaskRequest(kind=labeling_pb2.TaskKind.Value(f"TASK_KIND_{kind.upper()}") if kind else 0)
    run, lock = LabelingRun(), threading.Lock()
    bar = tqdm(total=tasks, desc="labelers", unit="task", disable=not progress)
    started = time.monotonic()

    def claim() -> bool:
        with lock:
            if run.submitted >= tasks:
                return False
            run.submitted += 1  # reserved; given back if no task comes
            return True

    def work(labeler: NoisyLabeler) -> None:
        metadata = bearer(labeler.token)
        idle_since = None
        while claim():
            try:
                task = stub.NextTask(request, metadata=metadata, timeout=timeout)
            except grpc.RpcError as err:
                with lock:
                    run.submitted -= 1
                if err.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                    raise
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > wait_s:
                    return
                time.sleep(0.5)
                continue
            idle_since = None
            submit = labeling_pb2.SubmitTaskRequest(task_id=task.task_id)
            if task.kind == labeling_pb2.TASK_KIND_DEMONSTRATION:
                submit.demonstration = write_demonstration(task.prompt_text, random.Random(f"{seed}:{task.task_id}"))
            else:
                submit.judgements.extend(labeler.judge(task.prompt_text, task.samples))
            reply = stub.SubmitTask(submit, metadata=metadata, timeout=timeout)
            with lock:
                run.per_labeler[labeler.user_id] += 1
                run.duplicates += reply.duplicate
                if task.kind == labeling_pb2.TASK_KIND_DEMONSTRATION:
                    run.demonstrations += 1
                else:
                    run.comparisons += 1
                bar.update(1)

    with ThreadPoolExecutor(max_workers=len(team), thread_name_prefix="sim-labeler") as pool:
        for future in [pool.submit(work, labeler) for labeler in team]:
            future.result()
    bar.close()
    run.seconds = time.monotonic() - started
    log_fields(
        log,
        logging.INFO,
        "simulated labelers done",
        submitted=run.submitted,
        demonstrations=run.demonstrations,
        comparisons=run.comparisons,
        seconds=round(run.seconds, 1),
    )
    return run


def labeling_stats(labeling: grpc.Channel, token: str, timeout: float = 30.0) -> labeling_pb2.LabelingStats:
    """The service's agreement and quality figures (for reports)."""
    stub = labeling_pb2_grpc.LabelingServiceStub(labeling)
    return stub.GetStats(labeling_pb2.GetStatsRequest(), metadata=bearer(token), timeout=timeout)


# --- the older direct pool -----------------------------------------------------------

MAX_K = 9  # the FeedbackService accepts K = 2..9 per comparison


@dataclass(frozen=True)
class QueuedPrompt:
    prompt_id: str
    user_id: str
    text: str


@dataclass
class LabelStats:
    submitted: int = 0
    duplicates: int = 0
    skipped_all_tied: int = 0
    mean_gold: float = 0.0  # mean gold score of what was submitted/ranked
    policy_versions: set[str] = field(default_factory=set)


def read_prompt_events(settings: Settings, timeout: float = 30.0) -> list[QueuedPrompt]:
    """The prompts users logged so far, as the labelling queue's input."""
    out = []
    for event in read_topic(settings, "prompts", timeout):
        text = event.text or "\n".join(m.content for m in event.messages if m.role == "user")
        out.append(QueuedPrompt(event.prompt_id, event.user_id, text))
    return out


def labelling_queue(prompts: Sequence[QueuedPrompt], seed: int = 0) -> list[QueuedPrompt]:
    """Round-robin over users (each user's prompts shuffled). A text sent
    more than once is queued once, as its first arrival (the copy the
    dataset builder keeps)."""
    rng = random.Random(seed)
    first: dict[str, QueuedPrompt] = {}
    for p in prompts:
        first.setdefault(p.text, p)
    by_user: dict[str, list[QueuedPrompt]] = {}
    for p in first.values():
        by_user.setdefault(p.user_id, []).append(p)
    users = sorted(by_user)
    for user in users:
        rng.shuffle(by_user[user])
    queue: list[QueuedPrompt] = []
    for depth in range(max((len(v) for v in by_user.values()), default=0)):
        queue += [by_user[u][depth] for u in users if depth < len(by_user[u])]
    return queue


class LabelerPool:
    """The simulated labelling team. Each call takes fresh prompts from the
    queue, so demonstrations and comparisons label different prompts."""

    def __init__(
        self,
        population: Population,
        feedback: grpc.Channel,
        policy: grpc.Channel | None = None,
        prompts: Sequence[QueuedPrompt] = (),
        seed: int = 0,
        timeout: float = 120.0,
    ):
        if not population.labelers:
            raise ValueError("the population has no labelers (n_labelers=0)")
        self.labelers: list[SimUser] = population.labelers
        self.feedback = feedback_pb2_grpc.FeedbackServiceStub(feedback)
        self.policy = policy_pb2_grpc.PolicyServiceStub(policy) if policy is not None else None
        self.queue = labelling_queue(prompts, seed)
        self.cursor = 0
        self.seed = seed
        self.timeout = timeout

    def add_prompts(self, prompts: Sequence[QueuedPrompt]) -> None:
        """Queue newly logged prompts (after the ones not yet labelled)."""
        known = {p.text for p in self.queue}
        self.queue += [p for p in labelling_queue(prompts, self.seed) if p.text not in known]

    def remaining(self) -> int:
        return len(self.queue) - self.cursor

    def _take(self, n: int) -> list[QueuedPrompt]:
        batch = self.queue[self.cursor : self.cursor + n]
        self.cursor += len(batch)
        return batch

    def _labeler(self, i: int) -> SimUser:
        return self.labelers[i % len(self.labelers)]

    def demonstrate(self, n: int, progress: bool = True) -> LabelStats:
        """Write and submit demonstrations for the next n prompts."""
        stats = LabelStats()
        scores = []
        for i, p in enumerate(tqdm(self._take(n), desc="labelers: demonstrations", unit="demo", disable=not progress)):
            response = write_demonstration(p.text, random.Random(f"{self.seed}:{p.prompt_id}"))
            labeler = self._labeler(i)
            reply = self.feedback.SubmitDemonstration(
                feedback_pb2.SubmitDemonstrationRequest(
                    request_id=f"sim-demo-{p.prompt_id}", prompt_id=p.prompt_id, prompt_text=p.text, response=response
                ),
                metadata=bearer(labeler.token),
                timeout=self.timeout,
            )
            stats.submitted += 1
            stats.duplicates += reply.duplicate
            scores.append(gold_score(p.text, response))
        stats.mean_gold = sum(scores) / len(scores) if scores else 0.0
        log_fields(
            log, logging.INFO, "demonstrations submitted", submitted=stats.submitted, duplicates=stats.duplicates
        )
        return stats

    def compare(
        self,
        n: int,
        k: int = 4,
        *,
        max_new_tokens: int = 48,
        temperature: float = 1.0,
        top_p: float = 1.0,
        concurrency: int = 4,
        progress: bool = True,
    ) -> LabelStats:
        """Rank K policy samples for each of the next n prompts by gold score.

        Empty and repeated samples are dropped first. A prompt left with
        fewer than 2 samples, or whose samples all score the same, carries
        no preference; it is skipped (counted in `skipped_all_tied`).
        Generation requests run `concurrency` at a time so the policy
        service can batch them.
        """
        if self.policy is None:
            raise ValueError("compare() needs a PolicyService channel")
        if not 2 <= k <= MAX_K:
            raise ValueError(f"k={k} must be in [2, {MAX_K}]")
        prompts = self._take(n)
        stats = LabelStats()
        ranked_scores: list[float] = []

        def sample(i_p: tuple[int, QueuedPrompt]):
            i, p = i_p
            params = policy_pb2.GenerationParameters(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                num_samples=k,
                seed=zlib.crc32(f"{self.seed}:{p.prompt_id}".encode()),
            )
            return (
                i,
                p,
                self.policy.Generate(
                    policy_pb2.GenerateRequest(prompt=p.text, parameters=params),
                    metadata=bearer(self._labeler(i).token),  # a labeler's own token (not logged as a prompt)
                    timeout=self.timeout,
                ),
            )

        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            results = pool.map(sample, enumerate(prompts))
            for i, p, generated in tqdm(
                results, total=len(prompts), desc="labelers: rank samples", unit="prompt", disable=not progress
            ):
                # The service refuses empty or repeated responses in a ranking; a
                # labeler would only see distinct answers anyway.
                texts = list({s.text.strip(): s.text for s in generated.samples if s.text.strip()}.values())
                ranks = gold_ranks(p.text, texts)
                stats.policy_versions.add(generated.model_version)
                if len(texts) < 2 or len(set(ranks)) == 1:
                    stats.skipped_all_tied += 1
                    continue
                responses = [
                    events_pb2.RankedResponse(text=t, policy_version=generated.model_version, rank=r)
                    for t, r in zip(texts, ranks, strict=True)
                ]
                reply = self.feedback.SubmitComparison(
                    feedback_pb2.SubmitComparisonRequest(
                        request_id=f"sim-cmp-{p.prompt_id}-k{k}",
                        prompt_id=p.prompt_id,
                        prompt_text=p.text,
                        responses=responses,
                    ),
                    metadata=bearer(self._labeler(i).token),
                    timeout=self.timeout,
                )
                stats.submitted += 1
                stats.duplicates += reply.duplicate
                ranked_scores += [gold_score(p.text, t) for t in texts]
        stats.mean_gold = sum(ranked_scores) / len(ranked_scores) if ranked_scores else 0.0
        log_fields(
            log,
            logging.INFO,
            "comparisons submitted",
            submitted=stats.submitted,
            skipped_all_tied=stats.skipped_all_tied,
            mean_gold=round(stats.mean_gold, 4),
            policy_versions=sorted(stats.policy_versions),
        )
        return stats
