from rlhf.v1 import common_pb2 as _common_pb2
from rlhf.v1 import events_pb2 as _events_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LogPromptRequest(_message.Message):
    __slots__ = ("request_id", "text", "messages", "source", "metadata", "user_id")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    source: str
    metadata: _containers.ScalarMap[str, str]
    user_id: str
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., source: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., user_id: _Optional[str] = ...) -> None: ...

class SubmitDemonstrationRequest(_message.Message):
    __slots__ = ("request_id", "prompt_id", "prompt_text", "response", "labeler_id", "task_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    LABELER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_id: str
    prompt_text: str
    response: str
    labeler_id: str
    task_id: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_id: _Optional[str] = ..., prompt_text: _Optional[str] = ..., response: _Optional[str] = ..., labeler_id: _Optional[str] = ..., task_id: _Optional[str] = ...) -> None: ...

class SubmitComparisonRequest(_message.Message):
    __slots__ = ("request_id", "prompt_id", "prompt_text", "responses", "labeler_id", "task_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    LABELER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_id: str
    prompt_text: str
    responses: _containers.RepeatedCompositeFieldContainer[_events_pb2.RankedResponse]
    labeler_id: str
    task_id: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_id: _Optional[str] = ..., prompt_text: _Optional[str] = ..., responses: _Optional[_Iterable[_Union[_events_pb2.RankedResponse, _Mapping]]] = ..., labeler_id: _Optional[str] = ..., task_id: _Optional[str] = ...) -> None: ...

class SubmitLabelsRequest(_message.Message):
    __slots__ = ("request_id", "prompt_id", "prompt_text", "response", "policy_version", "likert", "flags", "labeler_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    LIKERT_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    LABELER_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_id: str
    prompt_text: str
    response: str
    policy_version: str
    likert: int
    flags: _containers.RepeatedScalarFieldContainer[_events_pb2.LabelFlag]
    labeler_id: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_id: _Optional[str] = ..., prompt_text: _Optional[str] = ..., response: _Optional[str] = ..., policy_version: _Optional[str] = ..., likert: _Optional[int] = ..., flags: _Optional[_Iterable[_Union[_events_pb2.LabelFlag, str]]] = ..., labeler_id: _Optional[str] = ...) -> None: ...

class BulkItem(_message.Message):
    __slots__ = ("prompt", "demonstration", "comparison", "labels")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    DEMONSTRATION_FIELD_NUMBER: _ClassVar[int]
    COMPARISON_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    prompt: LogPromptRequest
    demonstration: SubmitDemonstrationRequest
    comparison: SubmitComparisonRequest
    labels: SubmitLabelsRequest
    def __init__(self, prompt: _Optional[_Union[LogPromptRequest, _Mapping]] = ..., demonstration: _Optional[_Union[SubmitDemonstrationRequest, _Mapping]] = ..., comparison: _Optional[_Union[SubmitComparisonRequest, _Mapping]] = ..., labels: _Optional[_Union[SubmitLabelsRequest, _Mapping]] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("event_id", "duplicate", "topic", "partition", "offset")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    duplicate: bool
    topic: str
    partition: int
    offset: int
    def __init__(self, event_id: _Optional[str] = ..., duplicate: _Optional[bool] = ..., topic: _Optional[str] = ..., partition: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...
