"""What a valid prompt, demonstration, comparison or label looks like.

The FeedbackService checks requests with these rules before anything is
written, and the dataset builder checks the events it reads with the same
rules (a record another producer wrote may break them: it goes to the
dead-letter topic). Every failure names the field and the limit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from rlhf.v1 import events_pb2

from services.common.config import Settings

# InstructGPT's labeling interface: K = 4..9 ranked outputs; we accept 2..9 so
# a pairwise comparison is possible too.
MIN_K, MAX_K = 2, 9
MIN_LIKERT, MAX_LIKERT = 1, 7
MAX_ID_CHARS = 128  # request ids, prompt ids, policy versions, sources
MAX_MESSAGES = 64  # chat turns in one logged prompt
CHAT_ROLES = ("system", "user", "assistant")
# ids: no whitespace, no control characters (C0, DEL, C1)
_PRINTABLE_TOKEN = re.compile(r"[^\s\x00-\x1f\x7f-\x9f]*")
KNOWN_FLAGS = frozenset(v.number for v in events_pb2.LabelFlag.DESCRIPTOR.values if v.number != 0)


class InvalidField(ValueError):
    """A request or event field breaks a rule; str() is `field: message`."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def within(self, prefix: str) -> InvalidField:
        """The same error, its field seen from an enclosing message (`items[3].comparison`)."""
        return InvalidField(f"{prefix}.{self.field}", self.message)


@dataclass(frozen=True)
class Limits:
    max_text_bytes: int = 32768
    max_metadata_bytes: int = 4096

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(settings.feedback_max_text_bytes, settings.feedback_max_metadata_bytes)


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
    if not _PRINTABLE_TOKEN.fullmatch(value):
        raise InvalidField(field, "must be printable and contain no whitespace")


def check_prompt_ref(prompt_id: str, prompt_text: str, limits: Limits) -> None:
    """Demonstrations, comparisons and labels name their prompt by id or by text."""
    check_id(prompt_id, "prompt_id")
    if not prompt_id and not prompt_text.strip():
        raise InvalidField("prompt_id", "give prompt_id (a logged prompt's event id) or prompt_text")
    check_text(prompt_text, "prompt_text", limits, required=False)


def check_messages(messages: Sequence, limits: Limits) -> None:
    if len(messages) > MAX_MESSAGES:
        raise InvalidField("messages", f"has {len(messages)} turns; the limit is {MAX_MESSAGES}")
    for i, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise InvalidField(f"messages[{i}].role", f"is {message.role!r}; must be one of {', '.join(CHAT_ROLES)}")
        check_text(message.content, f"messages[{i}].content", limits)
    if messages and not any(m.role == "user" for m in messages):
        raise InvalidField("messages", "needs at least one user turn")


def check_metadata(metadata: dict[str, str], limits: Limits) -> None:
    size = sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())
    if size > limits.max_metadata_bytes:
        raise InvalidField(
            "metadata", f"is {size} bytes; the limit is {limits.max_metadata_bytes} (RLHF_FEEDBACK_MAX_METADATA_BYTES)"
        )


def check_ranked_responses(responses: Sequence[events_pb2.RankedResponse], limits: Limits) -> None:
    """K responses, each with its policy version and a rank in 1..K (equal = tie)."""
    k = len(responses)
    if not MIN_K <= k <= MAX_K:
        raise InvalidField("responses", f"has {k} responses; K must be between {MIN_K} and {MAX_K}")
    seen: dict[str, int] = {}
    for i, response in enumerate(responses):
        check_text(response.text, f"responses[{i}].text", limits)
        first = seen.setdefault(response.text.strip(), i)
        if first != i:
            raise InvalidField(f"responses[{i}].text", f"duplicates responses[{first}].text")
        check_id(response.policy_version, f"responses[{i}].policy_version", required=True)
        check_id(response.sample_id, f"responses[{i}].sample_id")
        if response.likert:  # per-sample Likert and flags are optional on a comparison
            check_likert(response.likert, f"responses[{i}].likert")
        check_flags(response.flags, f"responses[{i}].flags")
        if not 1 <= response.rank <= k:
            raise InvalidField(
                f"responses[{i}].rank",
                f"is {response.rank}; every response needs a rank between 1 (best) and K={k}; equal ranks are ties",
            )
    if min(r.rank for r in responses) != 1:
        raise InvalidField("responses", "the ranking has no best response (no rank 1)")


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


# --- events (what the dataset builder reads back) ------------------------------


def check_event(kind: str, event, limits: Limits) -> None:
    """Raise InvalidField if an event read from `kind`'s topic breaks the rules."""
    check_id(event.event_id, "event_id", required=True)
    if kind == "prompts":
        check_id(event.user_id, "user_id", required=True)
        check_id(event.prompt_id, "prompt_id", required=True)
        check_text(event.text, "text", limits)
        return
    check_id(event.labeler_id, "labeler_id", required=True)
    check_prompt_ref(event.prompt_id, event.prompt_text, limits)
    if kind == "demonstrations":
        check_text(event.response, "response", limits)
    elif kind == "comparisons":
        check_ranked_responses(event.responses, limits)
    elif kind == "labels":
        check_text(event.response, "response", limits)
        check_id(event.policy_version, "policy_version", required=True)
        check_likert(event.likert)
        check_flags(event.flags)
    else:
        raise InvalidField("topic", f"{kind!r} carries no feedback events")


# --- undecodable requests --------------------------------------------------------


def locate_bad_utf8(data: bytes, descriptor: Descriptor, path: str = "") -> str | None:
    """Walk protobuf wire bytes and name the first string field that is not
    valid UTF-8 (e.g. `responses[1].text`); None if every string decodes.

    The protobuf runtime refuses such a message as a whole; this turns that
    into an error that names the field, as for every other validation.
    """
    pos, counts = 0, {}
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _varint(data, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                size, pos = _varint(data, pos)
                chunk, pos = data[pos : pos + size], pos + size
                field = descriptor.fields_by_number.get(number)
                if field is None:
                    continue
                name = path + field.name
                if field.is_repeated:
                    counts[number] = counts.get(number, -1) + 1
                    name += f"[{counts[number]}]"
                if field.type == FieldDescriptor.TYPE_STRING:
                    chunk.decode("utf-8")
                elif field.type == FieldDescriptor.TYPE_MESSAGE:
                    found = locate_bad_utf8(chunk, field.message_type, name + ".")
                    if found:
                        return found
            else:
                return None
    except UnicodeDecodeError:
        return name
    except IndexError:
        return None
    return None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
