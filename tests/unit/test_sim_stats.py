"""Win-rate and accuracy intervals, checked against hand computations."""

from __future__ import annotations

import math

import pytest

from services.sim.stats import mean_ci, paired_win_rate, wilson


def test_wilson_matches_hand_computation():
    # p = 0.8, n = 10, z = 1.96: centre 0.71673, half-width 0.22658
    low, high = wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)


def test_wilson_edges_stay_in_unit_interval():
    low, high = wilson(10, 10)
    assert high == pytest.approx(1.0) and low == pytest.approx(10 / (10 + 1.959963984540054**2), abs=1e-9)
    assert wilson(0, 10)[0] == 0.0
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes"):
        wilson(11, 10)


def test_paired_win_rate_hand_case():
    a = [1.0, 0.5, 0.2, 0.7]
    b = [0.5, 0.5, 0.4, 0.2]
    w = paired_win_rate(a, b)
    assert (w.n, w.wins, w.ties, w.losses) == (4, 2, 1, 1)
    assert w.win_rate == pytest.approx(0.625)
    assert (w.ci_low, w.ci_high) == pytest.approx(wilson(2.5, 4))
    # diffs 0.5, 0, -0.2, 0.5: mean 0.2, sample sd sqrt(0.38 / 3)
    half = 1.959963984540054 * math.sqrt(0.38 / 3) / 2
    assert w.mean_diff == pytest.approx(0.2)
    assert (w.diff_ci_low, w.diff_ci_high) == pytest.approx((0.2 - half, 0.2 + half))
    assert not w.significant


def test_clear_improvement_is_significant_and_symmetric():
    a = [0.9, 0.8, 0.95, 0.7, 0.85, 0.9, 0.75, 0.8] * 5
    b = [0.4, 0.5, 0.45, 0.6, 0.3, 0.5, 0.55, 0.4] * 5
    ab, ba = paired_win_rate(a, b), paired_win_rate(b, a)
    assert ab.win_rate == 1.0 and ab.significant and ab.ci_low > 0.5 and ab.diff_ci_low > 0
    assert ba.win_rate == 0.0 and ba.significant and ba.ci_high < 0.5
    assert ba.mean_diff == pytest.approx(-ab.mean_diff)


def test_all_ties_is_half_and_not_significant():
    w = paired_win_rate([0.5] * 6, [0.5] * 6)
    assert (w.win_rate, w.ties, w.mean_diff) == (0.5, 6, 0.0)
    assert not w.significant


def test_mean_ci_and_bad_input():
    assert mean_ci([]) == (0.0, 0.0, 0.0)
    assert mean_ci([0.3]) == (0.3, 0.3, 0.3)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_win_rate([1.0], [1.0, 0.0])
