"""Generation parameters: one validated form shared by gRPC, the HTTP API and
both backends, and what a generation produces.

Every check names the field and the limit it broke, so a client can fix its
request without reading server logs. Failures are `StatusError`s
(services/common/errors.py); the gRPC and HTTP edges map them to their codes.

Validation also keeps one request from harming the others it is batched with:
a parameter that cannot be sampled (a temperature so small that logits/T
overflows to inf, a repetition penalty that does the same) is refused here,
before it reaches the engine.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from services.common.config import Settings
from services.common.errors import invalid

MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 256
SEED_MASK = (1 << 64) - 1
# Logits are fp32 and, for the models served here, within a few hundred of 0:
# dividing them by anything >= 0.01 (twice: penalty, then temperature) stays far
# from fp32's 3e38, so softmax is finite. vLLM applies the same 0.01 floor.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 100.0
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
MAX_TOP_K = (1 << 32) - 1  # the proto's uint32; larger values act as "no limit" anyway


def _within(value: float, low: float, high: float) -> bool:
    """low <= value <= high, allowing for the float32 rounding of gRPC's fields (float32(0.01) < 0.01)."""
    return low * (1 - 1e-6) <= value <= high * (1 + 1e-6)


@dataclass(frozen=True)
class GenParams:
    """What one request asks for; `temperature == 0` means greedy decoding."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    num_samples: int = 1
    return_logprobs: bool = False
    prompt_logprobs: bool = False  # also score the prompt's tokens (TGI's decoder_input_details)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def sample_seeds(self) -> list[int]:
        """One seed per sample: the request's seed + index, or fresh random ones,
        so each of the K samples is reproducible on its own."""
        base = self.seed if self.seed is not None else secrets.randbits(63)
        return [(base + i) & SEED_MASK for i in range(self.num_samples)]


def validate(
    settings: Settings,
    *,
    max_new_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    repetition_penalty: float | None,
    stop: list[str] | tuple[str, ...] | None,
    seed: int | None,
    num_samples: int | None,
    return_logprobs: bool,
    prompt_logprobs: bool = False,
) -> GenParams:
    """Check every parameter against its rule and the server's limits; raise
    StatusError(INVALID_ARGUMENT) naming the first bad field."""
    limit = settings.max_new_tokens_limit
    if max_new_tokens is None or max_new_tokens == 0:
        max_new_tokens = settings.default_max_new_tokens
    if max_new_tokens < 1 or max_new_tokens > limit:
        raise invalid(f"max_new_tokens must be between 1 and {limit} (RLHF_MAX_NEW_TOKENS_LIMIT); got {max_new_tokens}")
    if temperature is None:
        temperature = 1.0
    if temperature != 0.0 and not _within(temperature, MIN_TEMPERATURE, MAX_TEMPERATURE):
        raise invalid(
            f"temperature must be >= 0: 0 for greedy, else between {MIN_TEMPERATURE} and {MAX_TEMPERATURE:g}; "
            f"got {temperature}"
        )
    if top_p is None:
        top_p = 1.0
    if not 0.0 < top_p <= 1.0:
        raise invalid(f"top_p must be in (0, 1]; got {top_p}")
    top_k = top_k or 0
    if not 0 <= top_k <= MAX_TOP_K:
        raise invalid(f"top_k must be >= 0 (0 = disabled) and <= {MAX_TOP_K}; got {top_k}")
    if repetition_penalty is None:
        repetition_penalty = 1.0
    if not _within(repetition_penalty, MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY):
        raise invalid(
            f"repetition_penalty must be > 0: between {MIN_REPETITION_PENALTY} and {MAX_REPETITION_PENALTY:g} "
            f"(1 = disabled); got {repetition_penalty}"
        )
    stops = tuple(stop or ())
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid(f"stop has {len(stops)} sequences; the limit is {MAX_STOP_SEQUENCES}")
    for s in stops:
        if not s or len(s) > MAX_STOP_CHARS:
            raise invalid(f"stop sequences must be 1..{MAX_STOP_CHARS} characters; got {s!r}")
    if seed is not None and not 0 <= seed <= SEED_MASK:
        raise invalid(f"seed must be in [0, 2^64); got {seed}")
    k = 1 if num_samples is None else num_samples
    k_limit = min(settings.max_samples, settings.max_batch)
    if not 1 <= k <= k_limit:
        which = "RLHF_MAX_SAMPLES" if k_limit == settings.max_samples else "RLHF_MAX_BATCH"
        raise invalid(f"num_samples must be between 1 and {k_limit} ({which}); got {num_samples}")
    return GenParams(
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        repetition_penalty=float(repetition_penalty),
        stop=stops,
        seed=seed,
        num_samples=int(k),
        return_logprobs=bool(return_logprobs),
        prompt_logprobs=bool(prompt_logprobs),
    )


def check_prompt(settings: Settings, prompt_ids: list[int], params: GenParams) -> None:
    """The prompt must be non-empty, within RLHF_MAX_PROMPT_TOKENS, and the whole
    request must fit the KV budget on its own (else it could never be scheduled)."""
    n = len(prompt_ids)
    if n == 0:
        raise invalid("prompt is empty")
    if n > settings.max_prompt_tokens:
        raise invalid(f"prompt has {n} tokens; the limit is {settings.max_prompt_tokens} (RLHF_MAX_PROMPT_TOKENS)")
    need = params.num_samples * (n + params.max_new_tokens)
    if need > settings.kv_budget_tokens:
        raise invalid(
            f"num_samples x (prompt tokens + max_new_tokens) = {need} exceeds the KV budget "
            f"{settings.kv_budget_tokens} (RLHF_KV_BUDGET_TOKENS)"
        )


# --- what a generation produces -------------------------------------------

FINISH_LENGTH, FINISH_EOS, FINISH_STOP = "length", "eos", "stop"


@dataclass
class TokenOut:
    id: int
    text: str
    logprob: float | None
    special: bool


@dataclass
class SampleOut:
    index: int
    text: str
    finish_reason: str
    generated_tokens: int
    seed: int | None
    tokens: list[TokenOut] = field(default_factory=list)
