"""Simulated users: a skewed population that logs prompts through the real
FeedbackService, with the awkward traffic the dataset rules exist for.

- Activity follows a Zipf law over users, and the heaviest users send more
  than 200 prompts (the builder keeps at most 200 per user).
- Some prompts are near-duplicates of the same user's earlier ones: the
  whole earlier prompt (at least 100 characters) plus a short tail
  ("Thanks!"), so they share a long common prefix (the builder
  de-duplicates those).
- Some prompts carry personal details: an e-mail address and a phone
  number (the builder filters the training split for them).

Everything is derived from one seed, so the same seed gives the same users,
tokens, prompts and request ids; re-submitting is idempotent because the
request ids repeat.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from rlhf.v1 import feedback_pb2, feedback_pb2_grpc
from tqdm import tqdm

from services.common.auth import Identity, bearer, write_tokens_file
from services.common.logs import get_logger, log_fields
from services.sim.tasks import Task, sample_task

log = get_logger(__name__)

FIRST_NAMES = [
    "ada",
    "ben",
    "chloe",
    "dev",
    "elena",
    "farid",
    "grace",
    "hugo",
    "ines",
    "jun",
    "kofi",
    "lena",
    "mateo",
    "nora",
]
NEAR_DUPLICATE_TAILS = [" Thanks!", " Thank you.", " Please.", " Quickly, please.", " (asking again)"]
PII_TEMPLATES = [
    " My email is {email} if you need it.",
    " You can reach me at {email} or {phone}.",
    " Call me on {phone} afterwards.",
]
SOURCE = "sim"


@dataclass(frozen=True)
class SimUser:
    user_id: str
    token: str


@dataclass(frozen=True)
class SimPrompt:
    user_id: str
    text: str
    request_id: str
    task: Task
    kind: str  # "fresh" | "near_duplicate" | "pii"


@dataclass(frozen=True)
class LoggedPrompt:
    """A prompt the FeedbackService accepted, as its reply described it."""

    prompt: SimPrompt
    event_id: str
    duplicate: bool
    topic: str
    partition: int
    offset: int


@dataclass
class Population:
    seed: int
    users: list[SimUser]
    labelers: list[SimUser]
    prompts: list[SimPrompt]

    def tokens(self) -> dict[str, Identity]:
        """Bearer token -> identity, for RLHF_TOKENS_FILE (see `write_tokens`)."""
        out = {u.token: Identity(u.user_id, "user") for u in self.users}
        out.update({lab.token: Identity(lab.user_id, "labeler") for lab in self.labelers})
        return out

    def write_tokens(self, path: Path) -> Path:
        write_tokens_file(Path(path), self.tokens())
        return Path(path)

    def token_of(self, user_id: str) -> str:
        for u in self.users + self.labelers:
            if u.user_id == user_id:
                return u.token
        raise KeyError(f"no simulated user or labeler {user_id!r}")

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {u.user_id: 0 for u in self.users}
        for p in self.prompts:
            out[p.user_id] += 1
        return out


def _token(seed: int, user_id: str) -> str:
    return "sim-" + hashlib.sha256(f"rlhf-sim:{seed}:{user_id}".encode()).hexdigest()[:32]


def zipf_counts(n_users: int, n_prompts: int, exponent: float, heavy: int, heavy_prompts: int) -> list[int]:
    """Prompts per user: the first `heavy` users send `heavy_prompts` each, the
    rest share what is left by a Zipf law over their rank, at least 1 each."""
    if not 0 <= heavy < n_users:
        raise ValueError(f"heavy={heavy} must be in [0, n_users={n_users})")
    rest = n_prompts - heavy * heavy_prompts
    light = n_users - heavy
    if rest < light:
        raise ValueError(f"n_prompts={n_prompts} leaves {rest} prompts for {light} light users; need at least one each")
    weights = [1.0 / (rank + 1) ** exponent for rank in range(light)]
    total = sum(weights)
    counts = [max(1, int(rest * w / total)) for w in weights]
    # Hand the rounding remainder to the most active light users, one each.
    i = 0
    while sum(counts) < rest:
        counts[i % light] += 1
        i += 1
    while sum(counts) > rest:
        j = max(range(light), key=lambda k: counts[k])
        counts[j] -= 1
    return [heavy_prompts] * heavy + counts


def _pii_suffix(rng: random.Random, user_id: str) -> str:
    name = rng.choice(FIRST_NAMES)
    email = f"{name}.{rng.randint(10, 99)}@example.com"
    phone = f"+1 555-{rng.randint(100, 999):03d}-{rng.randint(1000, 9999):04d}"
    return rng.choice(PII_TEMPLATES).format(email=email, phone=phone)


def make_population(
    seed: int = 0,
    n_users: int = 80,
    n_prompts: int = 1600,
    *,
    exponent: float = 1.0,
    heavy_users: int = 1,
    heavy_prompts: int = 230,
    near_duplicate_rate: float = 0.08,
    near_duplicate_min_chars: int = 100,
    pii_rate: float = 0.08,
    n_labelers: int = 3,
) -> Population:
    """A deterministic population: users, labelers, and every user's prompts.

    The defaults give about 130 prompts from users outside the training
    split (the builder's 10% validation + 10% test by user-id hash), enough
    for a held-out win rate with a useful confidence interval.
    """
    for name, rate in (("near_duplicate_rate", near_duplicate_rate), ("pii_rate", pii_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name}={rate} must be in [0, 1]")
    rng = random.Random(seed)
    users = [SimUser(f"user-{i:03d}", _token(seed, f"user-{i:03d}")) for i in range(n_users)]
    labelers = [SimUser(f"labeler-{i}", _token(seed, f"labeler-{i}")) for i in range(n_labelers)]
    counts = zipf_counts(n_users, n_prompts, exponent, heavy_users, heavy_prompts)
    prompts: list[SimPrompt] = []
    for user, count in zip(users, counts, strict=True):
        own: list[SimPrompt] = []
        for j in range(count):
            request_id = f"sim{seed}-{user.user_id}-{j:04d}"
            roll = rng.random()
            # A near-duplicate repeats a long earlier prompt, so that the two
            # share at least `near_duplicate_min_chars` leading characters.
            long_enough = [q for q in own if len(q.text) >= near_duplicate_min_chars]
            if long_enough and roll < near_duplicate_rate:
                earlier = rng.choice(long_enough)
                prompt = SimPrompt(
                    user.user_id,
                    earlier.text + rng.choice(NEAR_DUPLICATE_TAILS),
                    request_id,
                    earlier.task,
                    "near_duplicate",
                )
            else:
                task = sample_task(rng)
                if roll > 1.0 - pii_rate:
                    prompt = SimPrompt(
                        user.user_id, task.render() + _pii_suffix(rng, user.user_id), request_id, task, "pii"
                    )
                else:
                    prompt = SimPrompt(user.user_id, task.render(), request_id, task, "fresh")
            own.append(prompt)
        prompts.extend(own)
    # Interleave users the way live traffic arrives, keeping each user's order.
    order = sorted(range(len(prompts)), key=lambda i: (rng.random(), i))
    by_user: dict[str, list[SimPrompt]] = {}
    for p in prompts:
        by_user.setdefault(p.user_id, []).append(p)
    cursor = {u: 0 for u in by_user}
    arrival = []
    for i in order:
        uid = prompts[i].user_id
        arrival.append(by_user[uid][cursor[uid]])
        cursor[uid] += 1
    return Population(seed, users, labelers, arrival)


def submit_prompts(
    channel: grpc.Channel,
    population: Population,
    prompts: Iterable[SimPrompt] | None = None,
    *,
    timeout: float = 30.0,
    progress: bool = True,
) -> list[LoggedPrompt]:
    """Log prompts through FeedbackService.LogPrompt, each with its author's token.

    Raises grpc.RpcError on the first refusal: a simulation that silently
    loses prompts would bias every later number.
    """
    stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
    tokens = {u.user_id: u.token for u in population.users}
    todo = list(population.prompts if prompts is None else prompts)
    out = []
    for p in tqdm(todo, desc="users: log prompts", unit="prompt", disable=not progress):
        reply = stub.LogPrompt(
            feedback_pb2.LogPromptRequest(request_id=p.request_id, text=p.text, source=SOURCE),
            metadata=bearer(tokens[p.user_id]),
            timeout=timeout,
        )
        out.append(LoggedPrompt(p, reply.event_id, reply.duplicate, reply.topic, reply.partition, reply.offset))
    log_fields(
        log,
        20,
        "simulated users logged prompts",
        prompts=len(out),
        users=len({p.prompt.user_id for p in out}),
        duplicates=sum(p.duplicate for p in out),
    )
    return out
