"""Checks only a request needs: a logged prompt's chat messages and metadata,
and naming the field of a request that is not valid UTF-8.

The rules requests and events share (ids, texts, rankings, Likert, flags) and
each kind's event check live with the feedback vocabulary in
services/common/feedback.py, which the dataset builder reads too.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from services.common.feedback import CHAT_ROLES, InvalidField, Limits, check_text

MAX_MESSAGES = 64  # chat turns in one logged prompt


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
