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

from services.common.auth import Identity
from services.feedback import validation as v

# kind (the topic key) -> request type, event type, role the caller needs
KINDS: dict[str, tuple[type[Message], type[Message], str]] = {
    "prompts": (feedback_pb2.LogPromptRequest, events_pb2.PromptEvent, "user"),
    "demonstrations": (feedback_pb2.SubmitDemonstrationRequest, events_pb2.DemonstrationEvent, "labeler"),
    "comparisons": (feedback_pb2.SubmitComparisonRequest, events_pb2.ComparisonEvent, "labeler"),
    "labels": (feedback_pb2.SubmitLabelsRequest, events_pb2.LabelEvent, "labeler"),
}
# BulkItem's oneof names -> kind
BULK_KINDS = {"prompt": "prompts", "demonstration": "demonstrations", "comparison": "comparisons", "labels": "labels"}
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


def prepare(kind: str, request: Message, identity: Identity, limits: v.Limits) -> Prepared:
    """Validate `request` and build its event; raise validation.InvalidField."""
    v.check_id(request.request_id, "request_id")
    # No request id: the client opted out of retries, so any fresh id will do.
    request_id = request.request_id or uuid.uuid4().hex
    event_id = event_id_for(identity.user_id, request_id)
    now_ms = int(time.time() * 1000)
    if kind == "prompts":
        event = _prompt_event(request, identity, limits)
    else:
        v.check_prompt_ref(request.prompt_id, request.prompt_text, limits)
        common = dict(labeler_id=identity.user_id, prompt_id=request.prompt_id, prompt_text=request.prompt_text)
        if not request.prompt_id:  # a labeler-written prompt: its author is the labeler
            common.update(prompt_id=labeler_prompt_id(identity.user_id, request.prompt_text), user_id=identity.user_id)
        if kind == "demonstrations":
            v.check_text(request.response, "response", limits)
            event = events_pb2.DemonstrationEvent(response=request.response, **common)
        elif kind == "comparisons":
            v.check_ranked_responses(request.responses, limits)
            event = events_pb2.ComparisonEvent(responses=request.responses, **common)
        elif kind == "labels":
            v.check_text(request.response, "response", limits)
            v.check_id(request.policy_version, "policy_version", required=True)
            v.check_likert(request.likert)
            v.check_flags(request.flags)
            event = events_pb2.LabelEvent(
                response=request.response,
                policy_version=request.policy_version,
                likert=request.likert,
                flags=request.flags,
                **common,
            )
        else:
            raise KeyError(kind)
        if kind in ("demonstrations", "comparisons"):
            event.task_id = request.task_id  # lineage: the LabelingService task answered, if any
    event.event_id = event_id
    event.request_id = request_id
    event.created_unix_ms = now_ms
    if kind == "prompts":
        event.prompt_id = event_id
    return Prepared(kind, event, request_fingerprint(kind, request))


def _prompt_event(
    request: feedback_pb2.LogPromptRequest, identity: Identity, limits: v.Limits
) -> events_pb2.PromptEvent:
    v.check_messages(request.messages, limits)
    v.check_text(request.text, "text", limits, required=False)
    if not request.text.strip() and not request.messages:
        raise v.InvalidField("text", "give the prompt as text or as chat messages")
    v.check_id(request.source, "source")
    v.check_metadata(dict(request.metadata), limits)
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
