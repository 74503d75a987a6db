"""From a request and the caller's identity to the event written on Kafka.

Ids are derived, not random, so that retries converge:
- event_id = hash(caller's user id, request_id). A retry carries the same
  request_id, so it gets the same event id, even after the service restarted
  and forgot the request; the dataset builder then de-duplicates by event id.
- a logged prompt's prompt_id is its event id (the reply's event_id is what
  clients pass as prompt_id later).
- a prompt given only as text by a labeler is a labeler-written prompt
  (InstructGPT had those too): its prompt_id is hash(labeler, text) and its
  user_id (the author, the split key) is the labeler.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass

from google.protobuf.message import Message
from rlhf.v1 import events_pb2, feedback_pb2

from services.common import feedback
from services.common.auth import Identity
from services.common.feedback import InvalidField, Limits, check_id, check_prompt_ref, check_text
from services.feedback.validation import check_messages, check_metadata

DEFAULT_SOURCE = "api"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def event_id_for(user_id: str, request_id: str) -> str:
    return "ev-" + _digest("event", user_id, request_id)


def labeler_prompt_id(labeler_id: str, text: str) -> str:
    return "lp-" + _digest("labeler-prompt", labeler_id, text)


def request_fingerprint(kind: str, request: Message) -> str:
    """What a retry must repeat exactly: the payload, minus the ignored identity fields."""
    copy = type(request)()
    copy.CopyFrom(request)
    for ignored in ("user_id", "labeler_id"):
        if copy.DESCRIPTOR.fields_by_name.get(ignored) is not None:
            copy.ClearField(ignored)
    return hashlib.sha256(kind.encode() + b"\x00" + copy.SerializeToString(deterministic=True)).hexdigest()


@dataclass
class Prepared:
    """A validated request, ready to publish."""

    kind: str
    event: Message
    fingerprint: str

    @property
    def event_id(self) -> str:
        return self.event.event_id


def prepare(kind: str, request: Message, identity: Identity, limits: Limits) -> Prepared:
    """Validate `request` (a `kind` request, see services.common.feedback.KINDS)
    and build its event; raise InvalidField."""
    spec = feedback.KINDS[kind]
    check_id(request.request_id, "request_id")
    # No request id: the client opted out of retries, so any fresh id will do.
    request_id = request.request_id or uuid.uuid4().hex
    event_id = event_id_for(identity.user_id, request_id)
    if spec.on_prompt:
        event = _feedback_event(spec, request, identity, limits)
    else:
        event = _prompt_event(request, identity, limits)
        event.prompt_id = event_id
    event.event_id = event_id
    event.request_id = request_id
    event.created_unix_ms = int(time.time() * 1000)
    return Prepared(kind, event, request_fingerprint(kind, request))


# kind -> (payload field, whether it is repeated), looked up once rather than per request
_PAYLOAD_FIELDS = {
    key: tuple((name, kind.event_type.DESCRIPTOR.fields_by_name[name].is_repeated) for name in kind.payload)
    for key, kind in feedback.KINDS.items()
}


def _feedback_event(spec: feedback.FeedbackKind, request: Message, identity: Identity, limits: Limits) -> Message:
    """A demonstration, comparison or labels event: the prompt reference, the
    labeler, and the kind's payload fields copied from the request and checked."""
    check_prompt_ref(request.prompt_id, request.prompt_text, limits)
    event = spec.event_type(labeler_id=identity.user_id, prompt_id=request.prompt_id, prompt_text=request.prompt_text)
    if not request.prompt_id:  # a labeler-written prompt: its author is the labeler
        event.prompt_id = labeler_prompt_id(identity.user_id, request.prompt_text)
        event.user_id = identity.user_id
    for name, repeated in _PAYLOAD_FIELDS[spec.key]:
        if repeated:
            getattr(event, name).extend(getattr(request, name))
        else:
            setattr(event, name, getattr(request, name))
    spec.check(event, limits)
    return event


def _prompt_event(request: feedback_pb2.LogPromptRequest, identity: Identity, limits: Limits) -> events_pb2.PromptEvent:
    check_messages(request.messages, limits)
    check_text(request.text, "text", limits, required=False)
    if not request.text.strip() and not request.messages:
        raise InvalidField("text", "give the prompt as text or as chat messages")
    check_id(request.source, "source")
    check_metadata(dict(request.metadata), limits)
    # The dataset keeps the user's raw prompt; for a chat that is its last
    # user turn (the earlier turns stay on the event).
    text = request.text if request.text.strip() else [m.content for m in request.messages if m.role == "user"][-1]
    return events_pb2.PromptEvent(
        user_id=identity.user_id,
        text=text,
        messages=request.messages,
        source=request.source or DEFAULT_SOURCE,
        metadata=dict(request.metadata),
    )
