"""The feedback vocabulary: the one home of every kind of feedback and its domain limits.

`KINDS` is the one table of feedback kinds. Each row says how a kind travels:
the topic key (also the snapshot's file name), the FeedbackService RPC and
BulkItem field that carry it, its request and event messages, the role a
caller needs, how an event of the kind is checked, and the record the dataset
snapshot holds for it. The FeedbackService, the Kafka topic list, the dataset
builder and its rules all read this table; adding a kind means adding a row
(and its messages in protos/), not editing dispatch code.

The field checks below are the rules both sides apply: the FeedbackService
before it writes a request, the dataset builder to each event it reads back
(a record another producer wrote may break them: it goes to the dead-letter
topic). Every failure names the field and the limit. Checks that only a
request needs (chat messages, metadata) stay in services/feedback/validation.py.

Services, the dataset builder, the playground, the labeling service and the
simulator read their limits from here; nothing outside `services/feedback`
imports from that package.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message
from rlhf.v1 import events_pb2, feedback_pb2

from services.common.config import Settings
from services.common.errors import Status, StatusError

# --- domain limits -------------------------------------------------------------
# InstructGPT ranks K = 4..9 outputs per prompt. The FeedbackService accepts
# K >= 2 so that a plain pairwise comparison can be imported too.
MIN_K, MAX_K = 2, 9
# Stricter rule for tasks the platform itself hands to labelers (playground,
# labeling service, simulator): the paper's K = 4..9.
LABELING_MIN_K = 4
MIN_LIKERT, MAX_LIKERT = 1, 7
CHAT_ROLES = ("system", "user", "assistant")
# InstructGPT Table 3 metadata flags (numbers from events.proto's LabelFlag).
KNOWN_FLAGS = frozenset(v.number for v in events_pb2.LabelFlag.DESCRIPTOR.values if v.number != 0)
FLAG_NAMES = {
    v.number: v.name.removeprefix("LABEL_FLAG_").lower() for v in events_pb2.LabelFlag.DESCRIPTOR.values if v.number
}
MAX_ID_CHARS = 128  # request ids, prompt ids, policy versions, sources

# Call metadata of a BulkSubmit that is one submission (e.g. a labeler's
# ranking, labels and demonstration): every item is checked before any is
# written, so a bad one writes none of them.
VALIDATE_FIRST = ("rlhf-validate-first", "1")

# ids: no whitespace, no control characters (C0, DEL, C1)
_PRINTABLE_TOKEN = re.compile(r"[^\s\x00-\x1f\x7f-\x9f]*")


class InvalidField(StatusError):
    """A request or event field breaks a rule; str() is `field: reason`."""

    def __init__(self, field: str, reason: str):
        super().__init__(Status.INVALID_ARGUMENT, f"{field}: {reason}")
        self.field = field
        self.reason = reason

    def within(self, prefix: str) -> InvalidField:
        """The same error, its field seen from an enclosing message (`items[3].comparison`)."""
        return InvalidField(f"{prefix}.{self.field}", self.reason)


@dataclass(frozen=True)
class Limits:
    """The size limits an operator sets (RLHF_FEEDBACK_MAX_*)."""

    max_text_bytes: int = 32768
    max_metadata_bytes: int = 4096

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(settings.feedback_max_text_bytes, settings.feedback_max_metadata_bytes)


# --- field checks ------------------------------------------------------------------


def check_text(value: str, field: str, limits: Limits, required: bool = True) -> None:
    if required and not value.strip():
        raise InvalidField(field, "must not be empty")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > limits.max_text_bytes:
        raise InvalidField(
            field, f"is {size} bytes; the limit is {limits.max_text_bytes} (RLHF_FEEDBACK_MAX_TEXT_BYTES)"
        )
    if "\x00" in value:  # NUL breaks tokenizers and most downstream tools
        raise InvalidField(field, "must not contain NUL characters")


def check_id(value: str, field: str, required: bool = False) -> None:
    if required and not value.strip():
        raise InvalidField(field, "is required")
    if len(value) > MAX_ID_CHARS:
        raise InvalidField(field, f"is {len(value)} characters; the limit is {MAX_ID_CHARS}")
    if value and not _PRINTABLE_TOKEN.fullmatch(value):
        raise InvalidField(field, "must be printable and contain no whitespace")


def check_prompt_ref(prompt_id: str, prompt_text: str, limits: Limits) -> None:
    """Demonstrations, comparisons and labels name their prompt by id or by text."""
    check_id(prompt_id, "prompt_id")
    if not prompt_id and not prompt_text.strip():
        raise InvalidField("prompt_id", "give prompt_id (a logged prompt's event id) or prompt_text")
    check_text(prompt_text, "prompt_text", limits, required=False)


def check_ranked_responses(responses: Sequence[events_pb2.RankedResponse], limits: Limits) -> None:
    """K responses, each with its policy version and a rank in 1..K (equal = tie)."""
    k = len(responses)
    if not MIN_K <= k <= MAX_K:
        raise InvalidField("responses", f"has {k} responses; K must be between {MIN_K} and {MAX_K}")
    seen: dict[str, int] = {}
    for i, response in enumerate(responses):
        try:  # field names are relative to the response; its index is added only on an error
            check_text(response.text, "text", limits)
            first = seen.setdefault(response.text.strip(), i)
            if first != i:
                raise InvalidField("text", f"duplicates responses[{first}].text")
            _check_ranked_response(response, k)
        except InvalidField as err:
            raise err.within(f"responses[{i}]") from None
    if min(r.rank for r in responses) != 1:
        raise InvalidField("responses", "the ranking has no best response (no rank 1)")


def _check_ranked_response(response: events_pb2.RankedResponse, k: int) -> None:
    """A ranked response's fields after its text (names relative to the response)."""
    check_id(response.policy_version, "policy_version", required=True)
    check_id(response.sample_id, "sample_id")
    if response.likert:  # per-response Likert and flags are optional on a comparison
        check_likert(response.likert)
    check_flags(response.flags)
    if not 1 <= response.rank <= k:
        raise InvalidField(
            "rank", f"is {response.rank}; every response needs a rank between 1 (best) and K={k}; equal ranks are ties"
        )


def check_likert(likert: int, field: str = "likert") -> None:
    if not MIN_LIKERT <= likert <= MAX_LIKERT:
        raise InvalidField(field, f"is {likert}; must be between {MIN_LIKERT} and {MAX_LIKERT}")


def check_flags(flags: Iterable[int], field: str = "flags") -> None:
    seen: set[int] = set()
    for i, flag in enumerate(flags):
        if flag not in KNOWN_FLAGS:
            raise InvalidField(f"{field}[{i}]", f"{flag} is not a known LabelFlag")
        if flag in seen:
            raise InvalidField(f"{field}[{i}]", f"{events_pb2.LabelFlag.Name(flag)} is listed twice")
        seen.add(flag)


# --- each kind's payload: its check and its snapshot record ------------------------
# A payload check sees the fields a kind adds to the common ones (ids, prompt
# reference); a record function returns the snapshot fields it adds (the record
# shapes are listed in services/common/datasets.py).


def _check_prompt(event: events_pb2.PromptEvent, limits: Limits) -> None:
    check_id(event.user_id, "user_id", required=True)
    check_id(event.prompt_id, "prompt_id", required=True)
    check_text(event.text, "text", limits)


def _prompt_record(event: events_pb2.PromptEvent) -> dict[str, Any]:
    return {"text": event.text, "source": event.source}


def _check_demonstration(event: events_pb2.DemonstrationEvent, limits: Limits) -> None:
    check_text(event.response, "response", limits)


def _demonstration_record(event: events_pb2.DemonstrationEvent) -> dict[str, Any]:
    return {"response": event.response}


def _check_comparison(event: events_pb2.ComparisonEvent, limits: Limits) -> None:
    check_ranked_responses(event.responses, limits)


def ranked_response_record(response: events_pb2.RankedResponse) -> dict[str, Any]:
    """One ranked response in a comparison record (rank 1 = best, equal = tie), with
    its Likert score (0: not given), flags and LabelingService sample id."""
    return {
        "text": response.text,
        "policy_version": response.policy_version,
        "rank": response.rank,
        "sample_id": response.sample_id,
        "likert": response.likert,
        "flags": [events_pb2.LabelFlag.Name(f) for f in response.flags],
    }


def _comparison_record(event: events_pb2.ComparisonEvent) -> dict[str, Any]:
    return {"task_id": event.task_id, "responses": [ranked_response_record(r) for r in event.responses]}


def _check_labels(event: events_pb2.LabelEvent, limits: Limits) -> None:
    check_text(event.response, "response", limits)
    check_id(event.policy_version, "policy_version", required=True)
    check_likert(event.likert)
    check_flags(event.flags)


def _labels_record(event: events_pb2.LabelEvent) -> dict[str, Any]:
    return {
        "response": event.response,
        "policy_version": event.policy_version,
        "likert": event.likert,
        "flags": [events_pb2.LabelFlag.Name(f) for f in event.flags],
    }


# --- the table -----------------------------------------------------------------------


@dataclass(frozen=True)
class FeedbackKind:
    """One kind of feedback and everything that dispatches on it."""

    key: str  # topic key and snapshot file name (`<split>/<key>.jsonl`)
    rpc: str  # the FeedbackService unary method
    bulk_field: str  # the BulkItem `oneof item` field
    request_type: type[Message]
    event_type: type[Message]
    role: str  # the least role a caller needs (services/common/auth.py)
    # Feedback on a prompt (named by prompt_id or prompt_text, written by a
    # labeler) rather than the prompt itself.
    on_prompt: bool
    # The request fields copied as they are onto the event (feedback on a prompt).
    payload: tuple[str, ...]
    check: Callable[[Any, Limits], None]  # the payload's rules
    record: Callable[[Any], dict[str, Any]]  # the payload's snapshot fields


KINDS: dict[str, FeedbackKind] = {
    kind.key: kind
    for kind in (
        FeedbackKind(
            "prompts",
            "LogPrompt",
            "prompt",
            feedback_pb2.LogPromptRequest,
            events_pb2.PromptEvent,
            role="user",
            on_prompt=False,
            payload=(),
            check=_check_prompt,
            record=_prompt_record,
        ),
        FeedbackKind(
            "demonstrations",
            "SubmitDemonstration",
            "demonstration",
            feedback_pb2.SubmitDemonstrationRequest,
            events_pb2.DemonstrationEvent,
            role="labeler",
            on_prompt=True,
            payload=("response", "task_id"),
            check=_check_demonstration,
            record=_demonstration_record,
        ),
        FeedbackKind(
            "comparisons",
            "SubmitComparison",
            "comparison",
            feedback_pb2.SubmitComparisonRequest,
            events_pb2.ComparisonEvent,
            role="labeler",
            on_prompt=True,
            payload=("responses", "task_id"),
            check=_check_comparison,
            record=_comparison_record,
        ),
        FeedbackKind(
            "labels",
            "SubmitLabels",
            "labels",
            feedback_pb2.SubmitLabelsRequest,
            events_pb2.LabelEvent,
            role="labeler",
            on_prompt=True,
            payload=("response", "policy_version", "likert", "flags"),
            check=_check_labels,
            record=_labels_record,
        ),
    )
}
# The kinds that are feedback on a prompt (they follow their prompt into a split).
ON_PROMPT = tuple(key for key, kind in KINDS.items() if kind.on_prompt)
BY_RPC = {kind.rpc: kind for kind in KINDS.values()}
BY_BULK_FIELD = {kind.bulk_field: kind for kind in KINDS.values()}


def check_event(key: str, event: Message, limits: Limits) -> None:
    """Raise InvalidField if an event read from `key`'s topic breaks the rules."""
    kind = KINDS.get(key)
    if kind is None:
        raise InvalidField("topic", f"{key!r} carries no feedback events")
    check_id(event.event_id, "event_id", required=True)
    if kind.on_prompt:
        check_id(event.labeler_id, "labeler_id", required=True)
        check_prompt_ref(event.prompt_id, event.prompt_text, limits)
    kind.check(event, limits)


def record_of(key: str, event: Message) -> dict[str, Any]:
    """The dataset builder's record of an event: the snapshot shape plus created_unix_ms."""
    kind = KINDS[key]
    record = {
        "event_id": event.event_id,
        "prompt_id": event.prompt_id,
        "user_id": event.user_id,
        "created_unix_ms": event.created_unix_ms,
    }
    if kind.on_prompt:
        record.update(labeler_id=event.labeler_id, prompt_text=event.prompt_text)
    record.update(kind.record(event))
    return record
