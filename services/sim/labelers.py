"""Simulated labelers.

Only through the LabelingService (`run_labelers`, the front door): each
simulated labeler loops NextTask -> judge -> SubmitTask under its own bearer
token, exactly as a person in the playground does. The service decides which
logged prompt each gets, generates the K samples and writes the events; the
labelers never read Kafka. They judge with noise around the gold preference
(`NoisyLabeler`, noise model in services/sim/README.md), so that two of them
agree on about 73% of response pairs, as InstructGPT's labelers did.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from rlhf.v1 import events_pb2, labeling_pb2, labeling_pb2_grpc
from tqdm import tqdm

from services.common.auth import bearer
from services.common.feedback import MAX_LIKERT, MIN_LIKERT
from services.common.logs import get_logger, log_fields
from services.sim.tasks import gold_score, write_demonstration
from services.sim.users import SimUser

log = get_logger(__name__)

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


def wait_for_prompts(labeling: grpc.Channel, token: str, settle_s: float = 3.0, timeout: float = 120.0) -> int:
    """Wait until the service's prompt feed has read what users logged: its queue is
    non-empty and stopped growing for `settle_s`. Returns the prompts queued.

    Labeling before that would draw every task from the first prompts read,
    whatever split their authors are in (the service balances splits only
    over the prompts it has)."""
    deadline, last, since = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() < deadline:
        queued = labeling_stats(labeling, token).queued_prompts
        if queued != last:
            last, since = queued, time.monotonic()
        elif queued and time.monotonic() - since >= settle_s:
            return queued
        time.sleep(0.5)
    raise TimeoutError(f"the LabelingService queued {last} prompts and was still changing after {timeout:.0f}s")


def versions_judged_between(before: labeling_pb2.LabelingStats, after: labeling_pb2.LabelingStats) -> list[str]:
    """The policy versions whose samples were judged between two GetStats calls.

    The versions are the LabelingService's record of which policy produced
    each sample (labelers never see them), so a round's "collected on" needs
    no word from the client."""
    counts = {v.policy_version: v.samples for v in before.versions}
    return sorted(v.policy_version for v in after.versions if v.samples > counts.get(v.policy_version, 0))


def agreement_summary(stats: labeling_pb2.LabelingStats) -> dict:
    """The agreement figures of GetStats as a plain dict (for report.json)."""
    return {
        "pairwise_agreement": stats.pairwise_agreement if stats.compared_pairs else None,
        "compared_pairs": stats.compared_pairs,
        "kendall_tau_b": stats.kendall_tau_b if stats.compared_pairs else None,
        "overlap_tasks": stats.overlap_tasks,
    }
