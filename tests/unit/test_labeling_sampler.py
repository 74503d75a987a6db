"""How a comparison's K samples are split across the configured policy services."""

from __future__ import annotations

import random

from services.common.config import load_settings
from services.labeling.server import Sampler


def test_k_is_apportioned_by_weight_exactly_on_average(tmp_path):
    settings = load_settings(
        {"RLHF_HOME": str(tmp_path), "RLHF_LABELING_POLICY_TARGETS": "current:1=0.8,earlier:1=0.2"}
    )
    sampler = Sampler(settings)  # channels connect lazily: nothing is called here
    try:
        totals = {"current:1": 0, "earlier:1": 0}
        for seed in range(2000):
            counts = sampler.apportion(4, random.Random(seed))
            assert sum(counts.values()) == 4 and counts["current:1"] >= 3  # floor(4 x 0.8) always
            for target, n in counts.items():
                totals[target] += n
        assert abs(totals["earlier:1"] / 2000 - 0.8) < 0.05  # 4 x 0.2 per task on average
        assert sampler.apportion(9, random.Random(0)) in (
            {"current:1": 8, "earlier:1": 1},
            {"current:1": 7, "earlier:1": 2},
        )
    finally:
        sampler.close()


def test_the_default_is_the_promoted_policy_alone(tmp_path):
    settings = load_settings({"RLHF_HOME": str(tmp_path)})
    sampler = Sampler(settings)
    try:
        assert sampler.apportion(6, random.Random(1)) == {settings.policy_target: 6}
    finally:
        sampler.close()
