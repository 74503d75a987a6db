"""The feedback vocabulary: the one home of every kind of feedback and its domain limits.

Services, the dataset builder, the playground, the labeling service and the
simulator read their limits from here; nothing outside `services/feedback`
imports from that package.
"""

from __future__ import annotations

from rlhf.v1 import events_pb2

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
