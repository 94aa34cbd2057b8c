"""The benches' paired ratio (``bench.report.paired_ratio``): what its figures mean."""

from __future__ import annotations

import pytest

from bench.report import paired_ratio


def test_equal_servers_are_parity_with_a_zero_width_interval() -> None:
    result = paired_ratio([2.0, 3.0, 5.0], [2.0, 3.0, 5.0])
    assert (result.median, result.low, result.high, result.wins) == (1.0, 1.0, 1.0, 0)


def test_the_load_drifting_between_pairs_cancels_within_a_pair() -> None:
    """The machine slows down fourfold over the run; ours is 10 % faster in every pair."""
    reference = [100.0 / (1 + i) for i in range(20)]
    result = paired_ratio([1.1 * r for r in reference], reference)
    assert result.median == pytest.approx(1.1)
    assert result.low == pytest.approx(1.1) and result.high == pytest.approx(1.1)
    assert (result.wins, result.pairs) == (20, 20)


def test_noise_around_parity_gives_an_interval_that_holds_one() -> None:
    ratios = [0.9, 1.1, 0.95, 1.05, 1.0, 0.92, 1.08, 0.97, 1.03, 1.01]
    result = paired_ratio(ratios, [1.0] * len(ratios))
    assert result.low < 1.0 < result.high
    assert str(result).startswith(f"{result.median:.2f}x (95 % interval")


def test_series_must_pair() -> None:
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])
