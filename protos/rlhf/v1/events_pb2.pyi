from rlhf.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LabelFlag(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LABEL_FLAG_UNSPECIFIED: _ClassVar[LabelFlag]
    LABEL_FLAG_FAILS_TO_FOLLOW_INSTRUCTION: _ClassVar[LabelFlag]
    LABEL_FLAG_HALLUCINATION: _ClassVar[LabelFlag]
    LABEL_FLAG_INAPPROPRIATE_FOR_CUSTOMER_ASSISTANT: _ClassVar[LabelFlag]
    LABEL_FLAG_SEXUAL_CONTENT: _ClassVar[LabelFlag]
    LABEL_FLAG_VIOLENT_CONTENT: _ClassVar[LabelFlag]
    LABEL_FLAG_ENCOURAGES_VIOLENCE: _ClassVar[LabelFlag]
    LABEL_FLAG_DENIGRATES_PROTECTED_CLASS: _ClassVar[LabelFlag]
    LABEL_FLAG_HARMFUL_ADVICE: _ClassVar[LabelFlag]
    LABEL_FLAG_EXPRESSES_OPINION: _ClassVar[LabelFlag]
    LABEL_FLAG_EXPRESSES_MORAL_JUDGMENT: _ClassVar[LabelFlag]
    LABEL_FLAG_SATISFIES_CONSTRAINT: _ClassVar[LabelFlag]
LABEL_FLAG_UNSPECIFIED: LabelFlag
LABEL_FLAG_FAILS_TO_FOLLOW_INSTRUCTION: LabelFlag
LABEL_FLAG_HALLUCINATION: LabelFlag
LABEL_FLAG_INAPPROPRIATE_FOR_CUSTOMER_ASSISTANT: LabelFlag
LABEL_FLAG_SEXUAL_CONTENT: LabelFlag
LABEL_FLAG_VIOLENT_CONTENT: LabelFlag
LABEL_FLAG_ENCOURAGES_VIOLENCE: LabelFlag
LABEL_FLAG_DENIGRATES_PROTECTED_CLASS: LabelFlag
LABEL_FLAG_HARMFUL_ADVICE: LabelFlag
LABEL_FLAG_EXPRESSES_OPINION: LabelFlag
LABEL_FLAG_EXPRESSES_MORAL_JUDGMENT: LabelFlag
LABEL_FLAG_SATISFIES_CONSTRAINT: LabelFlag

class PromptEvent(_message.Message):
    __slots__ = ("event_id", "request_id", "user_id", "prompt_id", "text", "messages", "source", "metadata", "created_unix_ms")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    request_id: str
    user_id: str
    prompt_id: str
    text: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    source: str
    metadata: _containers.ScalarMap[str, str]
    created_unix_ms: int
    def __init__(self, event_id: _Optional[str] = ..., request_id: _Optional[str] = ..., user_id: _Optional[str] = ..., prompt_id: _Optional[str] = ..., text: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., source: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., created_unix_ms: _Optional[int] = ...) -> None: ...

class DemonstrationEvent(_message.Message):
    __slots__ = ("event_id", "request_id", "labeler_id", "prompt_id", "prompt_text", "response", "created_unix_ms", "user_id", "task_id")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABELER_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    request_id: str
    labeler_id: str
    prompt_id: str
    prompt_text: str
    response: str
    created_unix_ms: int
    user_id: str
    task_id: str
    def __init__(self, event_id: _Optional[str] = ..., request_id: _Optional[str] = ..., labeler_id: _Optional[str] = ..., prompt_id: _Optional[str] = ..., prompt_text: _Optional[str] = ..., response: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., user_id: _Optional[str] = ..., task_id: _Optional[str] = ...) -> None: ...

class RankedResponse(_message.Message):
    __slots__ = ("text", "policy_version", "rank", "sample_id", "likert", "flags")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    LIKERT_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    text: str
    policy_version: str
    rank: int
    sample_id: str
    likert: int
    flags: _containers.RepeatedScalarFieldContainer[LabelFlag]
    def __init__(self, text: _Optional[str] = ..., policy_version: _Optional[str] = ..., rank: _Optional[int] = ..., sample_id: _Optional[str] = ..., likert: _Optional[int] = ..., flags: _Optional[_Iterable[_Union[LabelFlag, str]]] = ...) -> None: ...

class ComparisonEvent(_message.Message):
    __slots__ = ("event_id", "request_id", "labeler_id", "prompt_id", "prompt_text", "responses", "created_unix_ms", "user_id", "task_id")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABELER_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    request_id: str
    labeler_id: str
    prompt_id: str
    prompt_text: str
    responses: _containers.RepeatedCompositeFieldContainer[RankedResponse]
    created_unix_ms: int
    user_id: str
    task_id: str
    def __init__(self, event_id: _Optional[str] = ..., request_id: _Optional[str] = ..., labeler_id: _Optional[str] = ..., prompt_id: _Optional[str] = ..., prompt_text: _Optional[str] = ..., responses: _Optional[_Iterable[_Union[RankedResponse, _Mapping]]] = ..., created_unix_ms: _Optional[int] = ..., user_id: _Optional[str] = ..., task_id: _Optional[str] = ...) -> None: ...

class LabelEvent(_message.Message):
    __slots__ = ("event_id", "request_id", "labeler_id", "prompt_id", "prompt_text", "response", "policy_version", "likert", "flags", "created_unix_ms", "user_id")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABELER_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    LIKERT_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    request_id: str
    labeler_id: str
    prompt_id: str
    prompt_text: str
    response: str
    policy_version: str
    likert: int
    flags: _containers.RepeatedScalarFieldContainer[LabelFlag]
    created_unix_ms: int
    user_id: str
    def __init__(self, event_id: _Optional[str] = ..., request_id: _Optional[str] = ..., labeler_id: _Optional[str] = ..., prompt_id: _Optional[str] = ..., prompt_text: _Optional[str] = ..., response: _Optional[str] = ..., policy_version: _Optional[str] = ..., likert: _Optional[int] = ..., flags: _Optional[_Iterable[_Union[LabelFlag, str]]] = ..., created_unix_ms: _Optional[int] = ..., user_id: _Optional[str] = ...) -> None: ...

class CheckpointEvent(_message.Message):
    __slots__ = ("type", "version", "kind", "role", "path", "manifest_sha256", "parents", "dataset_snapshot", "reason", "created_unix_ms")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TYPE_UNSPECIFIED: _ClassVar[CheckpointEvent.Type]
        TYPE_CREATED: _ClassVar[CheckpointEvent.Type]
        TYPE_PROMOTED: _ClassVar[CheckpointEvent.Type]
        TYPE_REJECTED: _ClassVar[CheckpointEvent.Type]
    TYPE_UNSPECIFIED: CheckpointEvent.Type
    TYPE_CREATED: CheckpointEvent.Type
    TYPE_PROMOTED: CheckpointEvent.Type
    TYPE_REJECTED: CheckpointEvent.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    DATASET_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    type: CheckpointEvent.Type
    version: str
    kind: str
    role: str
    path: str
    manifest_sha256: str
    parents: _containers.RepeatedScalarFieldContainer[str]
    dataset_snapshot: str
    reason: str
    created_unix_ms: int
    def __init__(self, type: _Optional[_Union[CheckpointEvent.Type, str]] = ..., version: _Optional[str] = ..., kind: _Optional[str] = ..., role: _Optional[str] = ..., path: _Optional[str] = ..., manifest_sha256: _Optional[str] = ..., parents: _Optional[_Iterable[str]] = ..., dataset_snapshot: _Optional[str] = ..., reason: _Optional[str] = ..., created_unix_ms: _Optional[int] = ...) -> None: ...

class DeadLetterEvent(_message.Message):
    __slots__ = ("source_topic", "partition", "offset", "reason", "payload", "created_unix_ms")
    SOURCE_TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    source_topic: str
    partition: int
    offset: int
    reason: str
    payload: bytes
    created_unix_ms: int
    def __init__(self, source_topic: _Optional[str] = ..., partition: _Optional[int] = ..., offset: _Optional[int] = ..., reason: _Optional[str] = ..., payload: _Optional[bytes] = ..., created_unix_ms: _Optional[int] = ...) -> None: ...
