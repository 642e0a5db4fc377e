"""The one throughput model: CostModel prior, weighted online refit, and the scheduler's numbers unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from plait.adaptive.throughput import (
    PerfParams,
    ThroughputModel,
    _Data,
    cost_model_predictor,
    default_prior_configs,
    fit_perf_params,
    fit_prior,
    grad_time,
    iteration_time,
    objective,
    sync_step_time,
)
from plait.cluster.load import load_cluster
from plait.cost.model import CostModel

TRUE = PerfParams(alpha_c=0.02, beta_c=0.001, alpha_n=0.05, beta_n=0.004, alpha_r=0.01, beta_r=0.002, gamma=2.0)
# what the CostModel might say before the job runs: compute 40 % slower, sync twice as fast
PRIOR = PerfParams(alpha_c=0.03, beta_c=0.0014, alpha_n=0.025, beta_n=0.002, alpha_r=0.005, beta_r=0.001, gamma=1.5)
CONFIGS = default_prior_configs(4, 4, [16, 64, 128])


def _exact(params: PerfParams):  # type: ignore[no-untyped-def]
    def predict(n: int, k: int, m: int) -> tuple[float, float]:
        return float(grad_time(params, m)), float(sync_step_time(params, n, k, m))
    return predict


@pytest.mark.parametrize("devices_per_replica", [1, 4])
def test_prior_reproduces_the_cost_model_predictions(devices_per_replica: int) -> None:
    cost = CostModel(load_cluster("dgx-a100:4"))
    predict = cost_model_predictor(cost, flops_per_sample=6 * 125e6 * 256, grad_bytes=4 * 125e6,
                                   kernels_per_step=300, devices_per_replica=devices_per_replica)
    configs = default_prior_configs(4, 8, [4, 16, 64], devices_per_replica=devices_per_replica)
    prior = fit_prior(predict, configs)
    a = np.array(configs, dtype=np.float64)
    assert np.allclose(grad_time(prior.params, a[:, 2]), prior.accum_time, rtol=0.03)
    assert np.allclose(sync_step_time(prior.params, a[:, 0], a[:, 1], a[:, 2]), prior.step_time, rtol=0.03)
    model = ThroughputModel(prior)
    assert model.params == prior.params  # no measurements: the model is the prior
    assert model.refit() == prior.params


def test_prior_fit_recovers_the_parameters_of_an_exact_predictor() -> None:
    prior = fit_prior(_exact(TRUE), CONFIGS)
    a = np.array(CONFIGS, dtype=np.float64)
    pred = iteration_time(prior.params, a[:, 0], a[:, 1], a[:, 2], 0)
    assert np.max(np.abs(pred / iteration_time(TRUE, a[:, 0], a[:, 1], a[:, 2], 0) - 1)) < 0.01


def _measure(model: ThroughputModel, rng: np.random.Generator, count: int, noise: float = 0.05) -> None:
    for n, k in [(1, 1), (1, 4), (2, 8)]:
        for m in (16, 64, 128):
            for _ in range(count):
                acc = float(grad_time(TRUE, m)) * np.exp(rng.normal(0, noise))
                step = float(sync_step_time(TRUE, n, k, m)) * np.exp(rng.normal(0, noise))
                model.observe(n, k, m, step, acc)


def _error(params: PerfParams, configs: list[tuple[int, int, int]]) -> float:
    a = np.array(configs, dtype=np.float64)
    truth = iteration_time(TRUE, a[:, 0], a[:, 1], a[:, 2], 1)
    return float(np.max(np.abs(iteration_time(params, a[:, 0], a[:, 1], a[:, 2], 1) / truth - 1)))


def test_online_fit_moves_from_the_prior_to_noisy_measurements() -> None:
    rng = np.random.default_rng(0)
    model = ThroughputModel(fit_prior(_exact(PRIOR), CONFIGS), prior_strength=10.0)
    measured = [(n, k, m) for n, k in [(1, 1), (1, 4), (2, 8)] for m in (16, 64, 128)]
    errors = [_error(model.params, measured)]
    for _ in range(3):
        _measure(model, rng, count=20)
        model.refit()
        errors.append(_error(model.params, measured))
    assert errors[0] > 0.2  # the prior is wrong by construction
    assert errors[-1] < 0.03  # 540 noisy (5 %) steps against a prior worth 10: the measurements win
    assert errors[1] < errors[0]
    for name in ("alpha_c", "beta_c"):  # sync terms hide behind compute (gamma 2): checked through the times
        assert getattr(model.params, name) == pytest.approx(getattr(TRUE, name), rel=0.15), name
    # a configuration never measured (4 nodes) is still predicted, from the prior's points and the fit
    assert float(model.iteration_time(4, 16, 64, 0)) > 0


def test_few_measurements_land_between_prior_and_measurement() -> None:
    prior = fit_prior(_exact(PRIOR), CONFIGS)
    model = ThroughputModel(prior, prior_strength=10.0)
    truth = float(iteration_time(TRUE, 1, 4, 64, 0))
    before = float(model.iteration_time(1, 4, 64, 0))
    model.observe(1, 4, 64, float(sync_step_time(TRUE, 1, 4, 64)), float(grad_time(TRUE, 64)), count=2)
    model.refit()
    after = float(model.iteration_time(1, 4, 64, 0))
    assert min(before, truth) < after < max(before, truth)


def test_without_a_prior_it_is_pollux_fit() -> None:
    model = ThroughputModel()
    with pytest.raises(ValueError, match="neither"):
        _ = model.params
    rng = np.random.default_rng(1)
    _measure(model, rng, count=3, noise=0.005)
    assert model.num_measured == 27
    fitted = model.refit()
    assert fitted.beta_c == pytest.approx(TRUE.beta_c, rel=0.1)


def test_observe_iteration_splits_a_step_with_accumulation() -> None:
    model = ThroughputModel(fit_prior(_exact(PRIOR), CONFIGS))
    model.observe_iteration(1, 2, 32, 3, iteration_s=0.4, accum_s=0.27)
    model.observe_iteration(1, 2, 32, 0, iteration_s=0.13)
    with pytest.raises(ValueError, match="accumulation"):
        model.observe_iteration(1, 2, 32, 3, iteration_s=0.4)
    assert model.num_measured == 2


def test_weighted_objective_gradient_and_unit_weights() -> None:
    nodes, reps = np.array([1, 1, 2, 3.0]), np.array([1, 4, 8, 12.0])
    bsz = np.array([32, 64, 32, 128.0])
    acc, step = np.array([0.05, 0.09, 0.06, 0.15]), np.array([0.06, 0.12, 0.2, 0.3])
    x = np.array([0.03, 0.002, 0.04, 0.003, 0.02, 0.001, 1.5])
    d = _Data(nodes, reps, bsz, acc, step, np.array([0.0, 2.0, 1.0, 3.0]), np.array([1.0, 0.5, 4.0, 2.0]))
    _, grad = objective(x, d)
    h = 1e-7
    num = [(objective(x + h * e, d)[0] - objective(x - h * e, d)[0]) / (2 * h) for e in np.eye(7)]
    assert np.allclose(grad, num, rtol=1e-5, atol=1e-6)
    plain = _Data(nodes, reps, bsz, acc, step)
    ones = _Data(nodes, reps, bsz, acc, step, np.ones(4), np.ones(4))
    assert objective(x, plain)[0] == objective(x, ones)[0]


def test_scheduler_fit_and_goodput_give_the_numbers_they_gave_before_the_move() -> None:
    """Recorded from plait.scheduler before the code moved into plait.adaptive (bit-identical then)."""
    from plait.scheduler.fit import fit_perf_params as sched_fit
    from plait.scheduler.goodput import BatchLimits, GoodputModel, GradParams

    assert sched_fit is fit_perf_params
    limits = BatchLimits(max_batch_size=4096, min_local_bsz=16, max_local_bsz=256)
    good, atomic, accum = GoodputModel(TRUE, GradParams(sqr=1.0, var=20.0), 128).optimize(
        np.array([1, 1, 2, 4]), np.array([1, 4, 8, 16]), limits)
    assert good == pytest.approx([864.8648648648629, 3016.64046141174, 4643.508926025377, 6563.282300402234],
                                 rel=1e-12)
    assert atomic.tolist() == [128, 115, 134, 123] and accum.tolist() == [0, 0, 0, 0]
    f = sched_fit([1, 1.0], [1, 2.0], [64, 64.0], [0.08, 0.08], [0.08, 0.1])
    assert f.to_array() == pytest.approx([0.04, 0.0006250002110150917, 0.061120076134236735, 1.1e-08,
                                          0.055563705576578845, 1e-08, 1.847017699828729], rel=1e-6)
