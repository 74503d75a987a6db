"""Labeler agreement on hand-made rankings with ties; every expected value
below was worked out by hand from the definitions in services/labeling/agreement.py."""

from __future__ import annotations

import math

import pytest

from services.labeling.agreement import agreement, compare


def test_identical_rankings_agree_fully_ties_included():
    a = {"x": 1, "y": 2, "z": 2, "w": 3}
    counts = compare(a, dict(a))
    # 6 pairs, all ordered alike; 1 pair (y, z) tied by both
    assert (counts.pairs, counts.same, counts.concordant, counts.discordant) == (6, 6, 5, 0)
    assert counts.agreement == 1.0
    assert counts.tau_b == pytest.approx(1.0)  # (5 - 0) / sqrt((6-1)(6-1))


def test_ties_against_strict_order_and_reversals():
    # A: x > y = z > w        B: y > x > w > z
    a = {"x": 1, "y": 2, "z": 2, "w": 3}
    b = {"x": 2, "y": 1, "z": 4, "w": 3}
    # pairs: (w,x): A x>w, B x>w  same, concordant
    #        (w,y): A y>w, B y>w  same, concordant
    #        (w,z): A z>w, B w>z  discordant
    #        (x,y): A x>y, B y>x  discordant
    #        (x,z): A x>z, B x>z  same, concordant
    #        (y,z): A tie, B y>z  not the same (a tie matches only a tie)
    counts = compare(a, b)
    assert (counts.pairs, counts.same, counts.concordant, counts.discordant, counts.tied_a, counts.tied_b) == (
        6,
        3,
        3,
        2,
        1,
        0,
    )
    assert counts.agreement == 0.5
    assert counts.tau_b == pytest.approx((3 - 2) / math.sqrt(5 * 6))


def test_all_tied_has_no_tau_but_counts_for_agreement():
    a = {"x": 1, "y": 1, "z": 1, "w": 1}
    b = {"x": 1, "y": 1, "z": 2, "w": 2}
    counts = compare(a, b)
    assert counts.same == 2  # (x,y) and (w,z) tied by both
    assert counts.agreement == pytest.approx(2 / 6)
    assert counts.tau_b is None


def test_across_tasks_and_labelers():
    tasks = {
        # three labelers on t1: (l1,l2) agree on 6/6, (l1,l3) and (l2,l3) on 5/6 (l3 ties a and b)
        "t1": {
            "l1": {"a": 1, "b": 2, "c": 3, "d": 4},
            "l2": {"a": 1, "b": 2, "c": 3, "d": 4},
            "l3": {"a": 1, "b": 1, "c": 3, "d": 4},
        },
        # two labelers on t2: fully reversed, 0/6
        "t2": {"l1": {"a": 1, "b": 2, "c": 3, "d": 4}, "l2": {"a": 4, "b": 3, "c": 2, "d": 1}},
        # one labeler: no overlap, ignored
        "t3": {"l1": {"a": 1, "b": 2, "c": 3, "d": 4}},
    }
    result = agreement(tasks)
    assert result.overlap_tasks == 2
    assert result.pairs == 24
    assert result.pairwise == pytest.approx((6 + 5 + 5 + 0) / 24)
    # tau-b per labeler pair: t1 (l1,l2) = 1; (l1,l3) = (l2,l3) = 5/sqrt(6*5); t2 (l1,l2) = -1
    assert result.kendall_tau_b == pytest.approx((1 + 2 * 5 / math.sqrt(30) - 1) / 4)
    assert result.per_labeler["l1"].agreement == pytest.approx((6 + 5 + 0) / 18)
    assert result.per_labeler["l3"].agreement == pytest.approx(10 / 12)
