"""The two-batch noise-scale estimator and its smoothing, in one process (one rank, accumulated micro-batches).

Accuracy targets (issue 10): the smoothed noise scale within 10 % of the exact value of a linear
regression with known features and noise, and per-step estimates of |G|^2 and tr(Sigma) unbiased
(their mean within 4 standard errors of the truth).
"""

from __future__ import annotations

import math

import pytest
import torch
from gns_problem import LinearProblem, loss, make_problem

from plait.adaptive import (
    ExpAverage,
    GradNoiseScale,
    GradNormProbe,
    GradStats,
    NormSample,
    combine_norms,
    estimate,
    expected_sqnorm,
    squared_norm,
)
from plait.errors import PlaitError

GLOBAL = 128
NUM_MICRO = 4
STEPS = 1500


def test_estimator_recovers_exact_statistics_from_expected_norms() -> None:
    truth = GradStats(sqr=2.5, trace=300.0)
    for small, big in [(8, 32), (1, 2), (16, 128), (3.0, 7.5)]:
        sample = NormSample(small_batch=small, small_sqnorm=expected_sqnorm(truth, small), big_batch=big,
                            big_sqnorm=expected_sqnorm(truth, big))
        got = estimate(sample)
        assert got.sqr == pytest.approx(truth.sqr, rel=1e-12)
        assert got.trace == pytest.approx(truth.trace, rel=1e-12)
    assert truth.noise_scale == pytest.approx(120.0)


def test_noise_scale_edge_cases() -> None:
    assert GradStats(sqr=0.0, trace=5.0).noise_scale == math.inf
    assert GradStats(sqr=-1.0, trace=5.0).noise_scale == math.inf  # a negative |G|^2 estimate counts as 0
    assert GradStats(sqr=1.0, trace=-2.0).noise_scale == 0.0
    assert GradStats(sqr=0.0, trace=0.0).noise_scale == 0.0


@pytest.mark.parametrize("kwargs", [
    {"small_batch": 0, "big_batch": 8},
    {"small_batch": -4, "big_batch": 8},
    {"small_batch": 8, "big_batch": 8},
    {"small_batch": 16, "big_batch": 8},
    {"small_batch": math.nan, "big_batch": 8},
    {"small_batch": 4, "big_batch": math.inf},
])
def test_bad_batch_sizes_are_plait_errors(kwargs: dict[str, float]) -> None:
    with pytest.raises(PlaitError, match="batch"):
        NormSample(small_sqnorm=1.0, big_sqnorm=1.0, **kwargs)


def test_bad_inputs_are_plait_errors() -> None:
    with pytest.raises(PlaitError, match="negative"):
        NormSample(small_batch=1, small_sqnorm=-1.0, big_batch=2, big_sqnorm=1.0)
    with pytest.raises(PlaitError, match="no local"):
        NormSample.from_norms([], 4, 1.0, 8)
    with pytest.raises(PlaitError, match="smoothing"):
        GradNoiseScale(32, smoothing=1.0)
    with pytest.raises(PlaitError, match="batch size"):
        GradNoiseScale(0)
    with pytest.raises(PlaitError, match="batch size"):
        GradStats(sqr=1.0, trace=1.0).var(0)
    with pytest.raises(PlaitError, match="num_local"):
        combine_norms(torch.tensor(1.0), torch.tensor(1.0), num_local=0)
    with pytest.raises(PlaitError, match="add_local"):
        GradNormProbe().combine(num_local=1)


def test_exp_average_bias_correction() -> None:
    avg = ExpAverage()
    assert avg.value == 0.0
    avg.update(7.0, 0.9)
    assert avg.value == pytest.approx(7.0)  # one value: the corrected average is that value, not 0.7
    avg.update(1.0, 0.9)
    assert avg.value == pytest.approx((0.9 * 0.1 * 7.0 + 0.1 * 1.0) / (0.9 * 0.1 + 0.1))


def test_smoother_decays_per_sample_and_skips_non_finite_steps() -> None:
    gns = GradNoiseScale(32, smoothing=0.9)
    truth = GradStats(sqr=1.0, trace=64.0)
    ok = gns.update(NormSample(small_batch=8, small_sqnorm=expected_sqnorm(truth, 8), big_batch=64,
                               big_sqnorm=expected_sqnorm(truth, 64)))
    assert ok and gns.sqr.weight == pytest.approx(1 - 0.9**2)  # a 64-sample step decays like two 32-sample steps
    assert gns.noise_scale == pytest.approx(64.0)
    assert not gns.update(NormSample(small_batch=8, small_sqnorm=math.inf, big_batch=64, big_sqnorm=1.0))
    assert not gns.update(NormSample(small_batch=8, small_sqnorm=math.nan, big_batch=64, big_sqnorm=1.0))
    assert (gns.num_updates, gns.num_skipped) == (1, 2)
    assert gns.noise_scale == pytest.approx(64.0)
    assert gns.efficiency(32) == pytest.approx(1.0)
    assert gns.efficiency(64) == pytest.approx((64 + 32) / (64 + 64))
    assert gns.gain(64) == pytest.approx(2 * (64 + 32) / (64 + 64))


def test_smoother_state_round_trips() -> None:
    gns = GradNoiseScale(32)
    gns.update(NormSample(small_batch=8, small_sqnorm=5.0, big_batch=32, big_sqnorm=2.0))
    other = GradNoiseScale(32)
    other.load_state_dict(gns.state_dict())
    assert other.stats == gns.stats and other.num_updates == 1
    with pytest.raises(PlaitError, match="initial batch"):
        GradNoiseScale(64).load_state_dict(gns.state_dict())


def test_no_statistics_means_no_scaling() -> None:
    gns = GradNoiseScale(32)
    assert gns.gain(128) == 1.0  # before any step: no learning-rate increase
    assert gns.noise_scale == 0.0


def test_squared_norm_and_probe_scaling() -> None:
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 2.0], [2.0, 0.0]], dtype=torch.bfloat16)
    assert float(squared_norm([a, b])) == pytest.approx(34.0)
    assert float(squared_norm([a, a, a.double()])) == pytest.approx(75.0)  # the fused list path, mixed dtypes
    assert float(squared_norm([])) == 0.0
    probe = GradNormProbe()
    probe.add_local([a], scale=2.0)  # a gradient held as grad / 2
    probe.add_local([b])  # another piece of the same local gradient
    probe.add_synced([a])
    three_ranks = lambda t: t * 3  # noqa: E731  (three ranks holding the same shares)
    pair = probe.combine(num_local=3, synced_copies=3, reduce=three_ranks)
    assert pair.tolist() == pytest.approx([4 * 25.0 + 9.0, 25.0])
    with pytest.raises(PlaitError):  # combine resets the probe
        probe.combine(num_local=1)


def _accumulated_step(problem: LinearProblem, w: torch.nn.Parameter, probe: GradNormProbe, gen: torch.Generator,
                      micro_norms: list[float]) -> None:
    """One step of 4 accumulated micro-batches as the Trainer runs it (loss / num_micro, gradients add up in .grad)."""
    micro = GLOBAL // NUM_MICRO
    w.grad = None
    for j in range(NUM_MICRO):
        before = None if w.grad is None else w.grad.clone()  # test only: the runtime never copies
        (loss(w, *problem.batch(gen, micro)) / NUM_MICRO).backward()
        assert w.grad is not None
        if j == 0:  # the first micro-batch's gradient is the whole buffer: one flat norm, no copy
            probe.add_local([w.grad], scale=NUM_MICRO)
        own = w.grad if before is None else w.grad - before
        micro_norms.append(float(squared_norm([own])) * NUM_MICRO**2)
    probe.add_synced([w.grad])


def test_one_rank_accumulation_is_unbiased_and_within_10_percent() -> None:
    problem = make_problem()
    truth = problem.truth()
    w = torch.nn.Parameter(problem.w.clone())
    gen = torch.Generator().manual_seed(1)
    probe = GradNormProbe()
    first, every = GradNoiseScale(GLOBAL), GradNoiseScale(GLOBAL)
    raw: list[GradStats] = []
    micro = GLOBAL // NUM_MICRO
    for _ in range(STEPS):
        norms: list[float] = []
        _accumulated_step(problem, w, probe, gen, norms)
        sample = probe.sample(small_batch=micro, big_batch=GLOBAL, num_local=1)
        first.update(sample)
        raw.append(estimate(sample))
        # with every micro-batch's norm (what FSDP2's per-micro-batch reduce-scatter input gives)
        every.update(NormSample.from_norms(norms, micro, sample.big_sqnorm, GLOBAL))
    assert_unbiased(raw, truth)
    for gns in (first, every):
        assert gns.noise_scale == pytest.approx(truth.noise_scale, rel=0.10)


def assert_unbiased(raw: list[GradStats], truth: GradStats, num_se: float = 4.0) -> None:
    """The mean per-step estimates of |G|^2 and tr(Sigma) lie within ``num_se`` standard errors of the truth."""
    for name in ("sqr", "trace"):
        values = torch.tensor([getattr(s, name) for s in raw], dtype=torch.float64)
        mean, se = float(values.mean()), float(values.std() / math.sqrt(len(values)))
        assert abs(mean - getattr(truth, name)) < num_se * se, f"{name}: mean {mean}, truth {getattr(truth, name)}, se {se}"
