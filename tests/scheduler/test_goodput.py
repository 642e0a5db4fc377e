"""The goodput model: step time, efficiency, batch-size choice and the step-time fit."""

from __future__ import annotations

import numpy as np
import pytest

from plait.scheduler.fit import _Data, fit_perf_params, objective
from plait.scheduler.goodput import (
    BatchLimits,
    GoodputModel,
    GradParams,
    PerfParams,
    efficiency,
    fixed_batch_config,
    iteration_time,
    sync_time,
)

TRUE = PerfParams(alpha_c=0.02, beta_c=0.001, alpha_n=0.05, beta_n=0.004, alpha_r=0.01, beta_r=0.002, gamma=2.0)


@pytest.mark.parametrize("sqr,var,m0,m", [(1.0, 4.0, 128, 128), (2.0, 0.5, 128, 1024), (0.3, 9.0, 32, 96),
                                          (5.0, 5.0, 200, 12800)])
def test_efficiency_matches_noise_scale_formula(sqr: float, var: float, m0: int, m: int) -> None:
    phi = m0 * var / sqr  # gradient noise scale in samples
    expected = (phi + m0) / (phi + m)
    assert efficiency(GradParams(sqr=sqr, var=var), m0, m) == pytest.approx(expected, rel=1e-12)


def test_efficiency_is_one_at_m0_and_falls_with_batch() -> None:
    grad = GradParams(sqr=1.0, var=3.0)
    eff = efficiency(grad, 64, np.array([64, 128, 256, 1024]))
    assert eff[0] == pytest.approx(1.0)
    assert np.all(np.diff(eff) < 0)


def test_gain_is_the_adascale_form_and_one_where_undefined() -> None:
    assert GradParams(sqr=2.0, var=6.0).gain(4.0) == pytest.approx(8.0 / 3.5, rel=1e-15)
    # a negative estimate counts as 0 (plait.adaptive's convention, as AdaptDL clamps): no signal, perfect scaling
    assert np.all(GradParams(sqr=-1.0, var=0.5).gain(np.array([4.0, 8.0])) == np.array([4.0, 8.0]))
    assert np.all(GradParams(sqr=0.0, var=0.0).gain(np.array([4.0, 8.0])) == 1.0)  # no statistics yet


def test_iteration_time_by_hand() -> None:
    # 2 nodes, 6 replicas, micro-batch 32, 3 accumulation steps.
    t_grad = 0.02 + 0.001 * 32
    t_sync = 0.05 + 0.004 * (6 - 2)
    t_opt = (t_grad**2 + t_sync**2) ** 0.5
    assert iteration_time(TRUE, 2, 6, 32, 3) == pytest.approx(3 * t_grad + t_opt, rel=1e-12)


def test_sync_time_uses_the_right_link() -> None:
    assert sync_time(TRUE, 1, 1) < 1e-7  # one replica: nothing to synchronise
    assert sync_time(TRUE, 1, 2) == pytest.approx(TRUE.alpha_r, rel=1e-6)  # retrogression starts at 3
    assert sync_time(TRUE, 1, 4) == pytest.approx(TRUE.alpha_r + 2 * TRUE.beta_r)
    assert sync_time(TRUE, 3, 4) == pytest.approx(TRUE.alpha_n + 2 * TRUE.beta_n)


def test_fixed_batch_config_by_hand() -> None:
    limits = BatchLimits(max_batch_size=4096, min_local_bsz=32, max_local_bsz=256)
    assert fixed_batch_config(2048, 4, 128, limits) == (256, 1)  # local 512 -> 2 micro-batches of 256
    assert fixed_batch_config(1000, 3, 128, limits) == (167, 1)  # ceil(1000/3)=334 -> 2 x 167
    assert fixed_batch_config(128, 1, 128, limits) == (128, 0)  # M0 on one GPU: no accumulation
    assert fixed_batch_config(256, 1, 128, limits) == (128, 1)  # above M0 on one GPU: accumulate


def _model(sqr: float, var: float) -> GoodputModel:
    return GoodputModel(TRUE, GradParams(sqr=sqr, var=var), 128)


def test_optimize_low_noise_prefers_small_batches_high_noise_large() -> None:
    limits = BatchLimits(max_batch_size=4096, min_local_bsz=16, max_local_bsz=512)
    _, atomic_lo, accum_lo = _model(1.0, 1e-6).optimize(1, 4, limits)
    _, atomic_hi, accum_hi = _model(1.0, 1e6).optimize(1, 4, limits)
    assert 4 * int(atomic_lo) * (int(accum_lo) + 1) == 128  # no noise: the batch is all waste
    assert 4 * int(atomic_hi) * (int(accum_hi) + 1) >= 4000  # pure noise: the largest batch wins


def test_optimize_returns_feasible_best_candidate() -> None:
    limits = BatchLimits(max_batch_size=4096, min_local_bsz=16, max_local_bsz=256)
    model = _model(1.0, 20.0)
    nodes = np.array([1, 1, 2, 4])
    reps = np.array([1, 4, 8, 16])
    good, atomic, accum = model.optimize(nodes, reps, limits)
    assert np.all((atomic >= 16) & (atomic <= 256))
    assert np.allclose(good, model.goodput(nodes, reps, atomic, accum))
    # Brute force over every micro-batch and accumulation that keeps the batch in range.
    for i in range(len(reps)):
        best = 0.0
        for s in range(0, 16):
            for m in range(16, 257):
                b = reps[i] * m * (s + 1)
                if 128 <= b <= 4096 and (reps[i] > 1 or s > 0 or b <= 128):
                    best = max(best, float(model.goodput(nodes[i], reps[i], m, s)))
        assert good[i] >= 0.97 * best  # 50 geometric candidates get within 3% of the true best


def test_fit_gradient_matches_finite_differences() -> None:
    nodes = np.array([1, 1, 2, 3.0])
    reps = np.array([1, 4, 8, 12.0])
    bsz = np.array([32, 64, 32, 128.0])
    d = _Data(nodes, reps, bsz, np.array([0.05, 0.09, 0.06, 0.15]), np.array([0.06, 0.12, 0.2, 0.3]))
    x = np.array([0.03, 0.002, 0.04, 0.003, 0.02, 0.001, 1.5])
    _, grad = objective(x, d)
    h = 1e-7
    num = [(objective(x + h * e, d)[0] - objective(x - h * e, d)[0]) / (2 * h) for e in np.eye(7)]
    assert np.allclose(grad, num, rtol=1e-5, atol=1e-6)


def _synthetic(params: PerfParams, rng: np.random.Generator, noise: float) -> tuple[np.ndarray, ...]:
    rows = [(n, k, m) for n, k in [(1, 1), (1, 2), (1, 3), (1, 4), (2, 4), (2, 8), (3, 12), (4, 16)]
            for m in (16, 64, 128)]
    a = np.array(rows, dtype=np.float64)
    accum = (params.alpha_c + params.beta_c * a[:, 2]) * np.exp(rng.normal(0, noise, len(a)))
    step = iteration_time(params, a[:, 0], a[:, 1], a[:, 2], 0) * np.exp(rng.normal(0, noise, len(a)))
    return a[:, 0], a[:, 1], a[:, 2], accum, step


def test_fit_recovers_known_parameters() -> None:
    nodes, reps, bsz, accum, step = _synthetic(TRUE, np.random.default_rng(0), 0.005)
    fitted = fit_perf_params(nodes, reps, bsz, accum, step)
    for name in ("alpha_c", "beta_c", "alpha_n", "beta_n", "alpha_r"):
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), rel=0.2), name
    assert fitted.gamma == pytest.approx(TRUE.gamma, abs=0.3)
    pred = iteration_time(fitted, nodes, reps, bsz, 0)
    assert np.max(np.abs(pred / step - 1)) < 0.05


def test_fit_pins_what_the_data_cannot_show() -> None:
    # Only single-node measurements with at most 2 replicas and one micro-batch size.
    nodes, reps, bsz = np.array([1, 1.0]), np.array([1, 2.0]), np.array([64, 64.0])
    accum = np.array([0.08, 0.08])
    step = np.array([0.08, 0.1])
    fitted = fit_perf_params(nodes, reps, bsz, accum, step)
    assert fitted.alpha_c == pytest.approx(0.04)  # half the mean compute time
    assert fitted.beta_r == pytest.approx(1e-8)  # no point beyond 2 replicas
    assert fitted.alpha_n >= 1.1 * fitted.alpha_r * (1 - 1e-9)  # going inter-node is never free
    assert fitted.beta_n >= 1.1 * fitted.beta_r * (1 - 1e-9)


def test_fit_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="positive"):
        fit_perf_params([1], [1], [32], [0.0], [0.1])
    with pytest.raises(ValueError, match="same"):
        fit_perf_params([1, 1], [1], [32], [0.1], [0.1])
