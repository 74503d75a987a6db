"""The dataset builder carries a labeled comparison's per-sample Likert scores,
flags, sample ids and task id into the snapshot record."""

from __future__ import annotations

from rlhf.v1 import events_pb2

from services.common.feedback import record_of


def test_comparison_record_carries_likert_flags_and_lineage():
    event = events_pb2.ComparisonEvent(
        event_id="ev-1",
        labeler_id="la",
        prompt_id="p-1",
        prompt_text="Name a colour.",
        task_id="task-1",
        responses=[
            events_pb2.RankedResponse(
                text="Blue.",
                policy_version="sft-2",
                rank=1,
                sample_id="task-1-s0",
                likert=6,
                flags=[events_pb2.LABEL_FLAG_SATISFIES_CONSTRAINT],
            ),
            events_pb2.RankedResponse(text="Dog.", policy_version="base-1", rank=2, sample_id="task-1-s1", likert=2),
        ],
    )
    record = record_of("comparisons", event)
    assert record["task_id"] == "task-1"
    assert record["responses"] == [
        {
            "text": "Blue.",
            "policy_version": "sft-2",
            "rank": 1,
            "sample_id": "task-1-s0",
            "likert": 6,
            "flags": ["LABEL_FLAG_SATISFIES_CONSTRAINT"],
        },
        {"text": "Dog.", "policy_version": "base-1", "rank": 2, "sample_id": "task-1-s1", "likert": 2, "flags": []},
    ]


def test_the_feedback_service_checks_per_response_likert_and_flags():
    import pytest

    from services.common.feedback import InvalidField, Limits, check_ranked_responses

    responses = [
        events_pb2.RankedResponse(text=f"answer {i}", policy_version="v1", rank=i + 1, likert=4) for i in range(4)
    ]
    check_ranked_responses(responses, Limits())
    responses[1].likert = 8
    with pytest.raises(InvalidField) as info:
        check_ranked_responses(responses, Limits())
    assert info.value.field == "responses[1].likert"
    responses[1].likert = 0  # not given: allowed on a comparison
    responses[2].flags.extend([events_pb2.LABEL_FLAG_HALLUCINATION, events_pb2.LABEL_FLAG_HALLUCINATION])
    with pytest.raises(InvalidField) as info:
        check_ranked_responses(responses, Limits())
    assert info.value.field == "responses[2].flags[1]"
