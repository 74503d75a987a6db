from rlhf.v1 import events_pb2 as _events_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_KIND_DEMONSTRATION: _ClassVar[TaskKind]
    TASK_KIND_COMPARISON: _ClassVar[TaskKind]
TASK_KIND_UNSPECIFIED: TaskKind
TASK_KIND_DEMONSTRATION: TaskKind
TASK_KIND_COMPARISON: TaskKind

class NextTaskRequest(_message.Message):
    __slots__ = ("kind",)
    KIND_FIELD_NUMBER: _ClassVar[int]
    kind: TaskKind
    def __init__(self, kind: _Optional[_Union[TaskKind, str]] = ...) -> None: ...

class TaskSample(_message.Message):
    __slots__ = ("sample_id", "text")
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    sample_id: str
    text: str
    def __init__(self, sample_id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "kind", "prompt_id", "prompt_text", "samples", "lease_expires_unix_ms", "split")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    kind: TaskKind
    prompt_id: str
    prompt_text: str
    samples: _containers.RepeatedCompositeFieldContainer[TaskSample]
    lease_expires_unix_ms: int
    split: str
    def __init__(self, task_id: _Optional[str] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., prompt_id: _Optional[str] = ..., prompt_text: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[TaskSample, _Mapping]]] = ..., lease_expires_unix_ms: _Optional[int] = ..., split: _Optional[str] = ...) -> None: ...

class SampleJudgement(_message.Message):
    __slots__ = ("sample_id", "likert", "flags", "rank")
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    LIKERT_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    sample_id: str
    likert: int
    flags: _containers.RepeatedScalarFieldContainer[_events_pb2.LabelFlag]
    rank: int
    def __init__(self, sample_id: _Optional[str] = ..., likert: _Optional[int] = ..., flags: _Optional[_Iterable[_Union[_events_pb2.LabelFlag, str]]] = ..., rank: _Optional[int] = ...) -> None: ...

class SubmitTaskRequest(_message.Message):
    __slots__ = ("task_id", "demonstration", "judgements")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    DEMONSTRATION_FIELD_NUMBER: _ClassVar[int]
    JUDGEMENTS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    demonstration: str
    judgements: _containers.RepeatedCompositeFieldContainer[SampleJudgement]
    def __init__(self, task_id: _Optional[str] = ..., demonstration: _Optional[str] = ..., judgements: _Optional[_Iterable[_Union[SampleJudgement, _Mapping]]] = ...) -> None: ...

class SubmitTaskReply(_message.Message):
    __slots__ = ("task_id", "event_id", "duplicate")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    event_id: str
    duplicate: bool
    def __init__(self, task_id: _Optional[str] = ..., event_id: _Optional[str] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LabelerStats(_message.Message):
    __slots__ = ("labeler_id", "submitted", "tasks_per_hour", "agreement_with_others", "compared_pairs")
    LABELER_ID_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    TASKS_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_WITH_OTHERS_FIELD_NUMBER: _ClassVar[int]
    COMPARED_PAIRS_FIELD_NUMBER: _ClassVar[int]
    labeler_id: str
    submitted: int
    tasks_per_hour: float
    agreement_with_others: float
    compared_pairs: int
    def __init__(self, labeler_id: _Optional[str] = ..., submitted: _Optional[int] = ..., tasks_per_hour: _Optional[float] = ..., agreement_with_others: _Optional[float] = ..., compared_pairs: _Optional[int] = ...) -> None: ...

class VersionQuality(_message.Message):
    __slots__ = ("policy_version", "samples", "likert_mean", "flag_rates")
    class FlagRatesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LIKERT_MEAN_FIELD_NUMBER: _ClassVar[int]
    FLAG_RATES_FIELD_NUMBER: _ClassVar[int]
    policy_version: str
    samples: int
    likert_mean: float
    flag_rates: _containers.ScalarMap[str, float]
    def __init__(self, policy_version: _Optional[str] = ..., samples: _Optional[int] = ..., likert_mean: _Optional[float] = ..., flag_rates: _Optional[_Mapping[str, float]] = ...) -> None: ...

class LabelingStats(_message.Message):
    __slots__ = ("pairwise_agreement", "compared_pairs", "kendall_tau_b", "overlap_tasks", "labelers", "versions", "submitted_per_split", "open_leases", "queued_prompts")
    class SubmittedPerSplitEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PAIRWISE_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    COMPARED_PAIRS_FIELD_NUMBER: _ClassVar[int]
    KENDALL_TAU_B_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_TASKS_FIELD_NUMBER: _ClassVar[int]
    LABELERS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_PER_SPLIT_FIELD_NUMBER: _ClassVar[int]
    OPEN_LEASES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    pairwise_agreement: float
    compared_pairs: int
    kendall_tau_b: float
    overlap_tasks: int
    labelers: _containers.RepeatedCompositeFieldContainer[LabelerStats]
    versions: _containers.RepeatedCompositeFieldContainer[VersionQuality]
    submitted_per_split: _containers.ScalarMap[str, int]
    open_leases: int
    queued_prompts: int
    def __init__(self, pairwise_agreement: _Optional[float] = ..., compared_pairs: _Optional[int] = ..., kendall_tau_b: _Optional[float] = ..., overlap_tasks: _Optional[int] = ..., labelers: _Optional[_Iterable[_Union[LabelerStats, _Mapping]]] = ..., versions: _Optional[_Iterable[_Union[VersionQuality, _Mapping]]] = ..., submitted_per_split: _Optional[_Mapping[str, int]] = ..., open_leases: _Optional[int] = ..., queued_prompts: _Optional[int] = ...) -> None: ...
