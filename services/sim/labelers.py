"""Simulated labelers: they see the prompts users logged (the platform's
prompts topic), write demonstrations, and rank K samples of the serving
policy by the gold preference (`services.sim.tasks.gold_score`).

Everything goes through the platform's front doors: prompts are read from
the broker, samples come from PolicyService.Generate (num_samples = K), and
work is submitted with FeedbackService.SubmitDemonstration /
SubmitComparison under each labeler's own bearer token. Request ids derive
from the prompt and the task, so a re-run submits nothing twice.

Which prompts get labelled: one queue per labeler pool, interleaving users
round-robin (each user's prompts in a seeded shuffle), so light users, and
so the held-out split, get labels too, and the heaviest user does not soak
up the labelling budget. Exact repeats of a prompt text are labelled once.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from rlhf.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc, policy_pb2, policy_pb2_grpc
from tqdm import tqdm

from services.common.auth import bearer
from services.common.bus import read_topic
from services.common.config import Settings
from services.common.logs import get_logger, log_fields
from services.sim.tasks import gold_ranks, gold_score, write_demonstration
from services.sim.users import Population, SimUser

log = get_logger(__name__)

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
        log_fields(log, 20, "demonstrations submitted", submitted=stats.submitted, duplicates=stats.duplicates)
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
            20,
            "comparisons submitted",
            submitted=stats.submitted,
            skipped_all_tied=stats.skipped_all_tied,
            mean_gold=round(stats.mean_gold, 4),
            policy_versions=sorted(stats.policy_versions),
        )
        return stats
