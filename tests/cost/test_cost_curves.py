"""Fits and interpolation: alpha-beta recovery, monotone log-log curves, table plus extrapolation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plait.cost.curves import LogLogCurve, MessageCurve, fit_alpha_beta, isotonic


def test_fit_recovers_exact_alpha_beta() -> None:
    alpha, beta = 250e-6, 3e-10
    fit = fit_alpha_beta((x, alpha + beta * x) for x in (1e3, 1e4, 1e5, 1e6, 1e7))
    assert fit.alpha == pytest.approx(alpha, rel=1e-9)
    assert fit.beta == pytest.approx(beta, rel=1e-9)


def test_fit_keeps_alpha_and_beta_non_negative() -> None:
    # Times falling with size would need a negative beta: the fit drops to a constant instead.
    fit = fit_alpha_beta([(1e3, 2e-3), (1e6, 1e-3)])
    assert fit.alpha > 0 and fit.beta == 0
    only = fit_alpha_beta([(1e6, 1e-3)])
    assert (only.alpha, only.beta) == (1e-3, 0.0)


def test_curve_is_exact_at_points_and_log_linear_between() -> None:
    curve = LogLogCurve([(1e3, 1e-6), (1e6, 1e-3)])
    assert curve(1e3) == pytest.approx(1e-6)
    assert curve(1e6) == pytest.approx(1e-3)
    assert curve(math.sqrt(1e9)) == pytest.approx(math.sqrt(1e-9))


def test_curve_extends_by_rate_or_flat() -> None:
    by_rate = LogLogCurve([(100.0, 1.0), (1000.0, 5.0)])
    assert by_rate(10.0) == pytest.approx(0.1)  # the smallest point's time per unit
    assert by_rate(1e4) == pytest.approx(50.0)  # the largest point's time per unit
    flat = LogLogCurve([(100.0, 1.0), (1000.0, 5.0)], below="flat", above="flat")
    assert flat(10.0) == 1.0 and flat(1e4) == 5.0


def test_curve_merges_repeats_and_never_decreases() -> None:
    curve = LogLogCurve([(10.0, 3.0), (10.0, 1.0), (10.0, 2.0), (100.0, 1.5), (1000.0, 9.0)])
    assert curve.times == [1.75, 1.75, 9.0]  # median of the repeats, then pooled to stay monotone


def test_isotonic_pools_violators_by_least_squares() -> None:
    assert isotonic([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    assert isotonic([3.0, 2.0, 1.0]) == [2.0, 2.0, 2.0]
    assert isotonic([7.0, 1.0, 4.0, 10.0]) == [4.0, 4.0, 4.0, 10.0]  # one high outlier does not lift the rest


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(1.0, 1e9), st.floats(1e-7, 10.0)), min_size=1, max_size=12))
def test_curve_is_monotone_in_size(points: list[tuple[float, float]]) -> None:
    curve = LogLogCurve(points)
    grid = [10 ** (k / 4) for k in range(-4, 44)]
    values = [curve(x) for x in grid]
    assert all(b >= a * (1 - 1e-12) for a, b in zip(values, values[1:], strict=False))


def test_message_curve_interpolates_then_extrapolates_continuously() -> None:
    alpha, beta = 1e-4, 1e-9
    sizes = [4096, 65536, 1048576]
    curve = MessageCurve([(s, alpha + beta * s) for s in sizes])
    assert curve(65536) == pytest.approx(alpha + beta * 65536)
    assert curve(16) == pytest.approx(alpha + beta * 4096)  # latency floor below the table
    top = sizes[-1]
    assert curve(top * 1.000001) == pytest.approx(curve(top), rel=1e-5)
    assert curve(64 * top) == pytest.approx(alpha + beta * 64 * top, rel=1e-6)
