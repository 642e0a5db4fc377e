"""The goodput optimizer: the batch, micro-batch and accumulation that maximise throughput x efficiency."""

from __future__ import annotations

import math

import numpy as np
import pytest

from plait.adaptive.goodput import BatchLimits, GoodputModel, GradParams, choose_batch
from plait.adaptive.noise import GradStats
from plait.adaptive.throughput import PerfParams, ThroughputModel, fit_prior, grad_time, sync_step_time

TRUE = PerfParams(alpha_c=0.02, beta_c=0.001, alpha_n=0.05, beta_n=0.004, alpha_r=0.01, beta_r=0.002, gamma=2.0)
# compute only, no overlap: one replica's step is alpha + beta * m
LINEAR = PerfParams(alpha_c=0.1, beta_c=0.001, alpha_n=1e-8, beta_n=1e-8, alpha_r=1e-8, beta_r=1e-8, gamma=1.0)


def test_closed_form_optimum_sqrt_alpha_phi_over_beta() -> None:
    # goodput(m) = m / (a + b m) * (phi + M0) / (phi + m) peaks at m* = sqrt(a * phi / b) (d log / dm = 0)
    phi, m0 = 1000.0, 8
    limits = BatchLimits(max_batch_size=4096, min_local_bsz=8, max_local_bsz=4096, accumulation=False)
    choice = choose_batch(LINEAR, GradParams.from_noise_scale(phi, m0), m0, 1, 1, limits)
    m_star = math.sqrt(0.1 * phi / 0.001)  # 316.2
    assert choice.accum_steps == 0 and choice.global_batch == choice.local_bsz
    assert abs(choice.local_bsz - m_star) <= 1
    good = [m / (0.1 + 0.001 * m) * (phi + m0) / (phi + m) for m in range(8, 4097)]
    assert choice.local_bsz == 8 + int(np.argmax(good))
    assert choice.goodput == pytest.approx(max(good), rel=1e-6)


def test_zero_noise_picks_the_smallest_batch_and_high_noise_a_large_one() -> None:
    limits = BatchLimits(max_batch_size=4096, min_local_bsz=16, max_local_bsz=512)
    low = choose_batch(TRUE, GradParams(sqr=1.0, var=0.0), 128, 1, 4, limits)
    assert low.global_batch == 128 and low.efficiency == pytest.approx(1.0)
    high = choose_batch(TRUE, GradParams(sqr=1.0, var=1e6), 128, 1, 4, limits)
    assert high.global_batch >= 4000
    mid = choose_batch(TRUE, GradParams(sqr=1.0, var=20.0), 128, 1, 4, limits)
    assert low.global_batch < mid.global_batch < high.global_batch


def _brute(perf: PerfParams, grad: GradParams, m0: int, n: int, k: int, limits: BatchLimits) -> float:
    model = GoodputModel(perf, grad, m0)
    best = 0.0
    for s in range(0, 64 if limits.accumulation else 1):
        for m in range(limits.min_local_bsz, limits.max_local_bsz + 1):
            b = k * m * (s + 1)
            single_ok = k > 1 or s > 0 or b <= m0 or not limits.accumulation
            if max(m0, k * limits.min_local_bsz) <= b <= limits.max_batch_size and single_ok:
                best = max(best, float(model.goodput(n, k, m, s)))
    return best


@pytest.mark.parametrize(("nodes", "replicas", "var", "accumulation"),
                         [(1, 1, 20.0, True), (1, 4, 20.0, True), (2, 8, 5.0, True), (1, 4, 200.0, False)])
def test_matches_brute_force_and_respects_the_bounds(nodes: int, replicas: int, var: float,
                                                     accumulation: bool) -> None:
    limits = BatchLimits(max_batch_size=2048, min_local_bsz=16, max_local_bsz=128, accumulation=accumulation)
    grad = GradParams(sqr=1.0, var=var)
    c = choose_batch(TRUE, grad, 64, nodes, replicas, limits)
    assert 16 <= c.local_bsz <= 128
    assert max(64, replicas * 16) <= c.global_batch <= 2048
    assert c.global_batch == replicas * c.local_bsz * (c.accum_steps + 1)
    assert accumulation or c.accum_steps == 0
    if replicas == 1 and accumulation and c.global_batch > 64:
        assert c.accum_steps >= 1  # one replica measures its noise scale across micro-batches
    assert c.goodput == pytest.approx(_brute(TRUE, grad, 64, nodes, replicas, limits), rel=1e-9)
    # at least as good as the scheduler's 50-candidate search
    sampled, _, _ = GoodputModel(TRUE, grad, 64).optimize(nodes, replicas, limits)
    assert c.goodput >= float(sampled) * (1 - 1e-12)


def test_max_accum_steps_and_infeasible_bounds() -> None:
    limits = BatchLimits(max_batch_size=4096, min_local_bsz=16, max_local_bsz=64)
    c = choose_batch(TRUE, GradParams(sqr=0.0, var=1.0), 64, 1, 2, limits, max_accum_steps=3)
    assert c.accum_steps <= 3 and c.global_batch == 2 * 64 * 4  # all noise: largest batch the bounds allow
    with pytest.raises(ValueError, match="no batch fits"):
        choose_batch(TRUE, GradParams(sqr=1.0, var=1.0), 64, 1, 8, BatchLimits(max_batch_size=100, min_local_bsz=16,
                                                                                  max_local_bsz=64))


def test_uses_the_throughput_model_and_the_estimator_statistics() -> None:
    def predict(n: int, k: int, m: int) -> tuple[float, float]:
        return float(grad_time(TRUE, m)), float(sync_step_time(TRUE, n, k, m))

    model = ThroughputModel(fit_prior(predict, [(1, 1, 16), (1, 1, 128), (1, 2, 64), (1, 4, 64), (2, 8, 64)]))
    grad = GradParams.from_stats(GradStats(sqr=2.0, trace=2.0 * 300.0), 64)  # noise scale 300
    assert grad.var * 64 / grad.sqr == pytest.approx(300.0)
    limits = BatchLimits(max_batch_size=2048, min_local_bsz=16, max_local_bsz=256)
    via_model = choose_batch(model, grad, 64, 1, 4, limits)
    via_params = choose_batch(model.params, grad, 64, 1, 4, limits)
    assert via_model == via_params
    assert via_model.throughput == pytest.approx(float(model.throughput(1, 4, via_model.local_bsz,
                                                                         via_model.accum_steps)))


def test_min_accum_steps_keeps_one_replica_accumulating() -> None:
    # zero noise with one replica picks M0 in one micro-batch; the Trainer's one replica asks for s >= 1 (its estimate)
    limits = BatchLimits(max_batch_size=1024, min_local_bsz=8, max_local_bsz=256)
    plain = choose_batch(LINEAR, GradParams(sqr=1.0, var=0.0), 64, 1, 1, limits)
    assert (plain.global_batch, plain.accum_steps) == (64, 0)
    kept = choose_batch(LINEAR, GradParams(sqr=1.0, var=0.0), 64, 1, 1, limits, min_accum_steps=1)
    assert kept.accum_steps >= 1 and kept.global_batch == 64 and kept.local_bsz == 32
