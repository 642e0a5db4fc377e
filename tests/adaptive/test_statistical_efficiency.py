"""Statistical efficiency, AdaScale gain, learning-rate rules and progress against hand-computed values."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from plait.adaptive import (
    GradStats,
    Progress,
    adascale_gain,
    lr_factor,
    noise_scale_efficiency,
    noise_scale_gain,
    resolve_lr_scaling,
    statistical_efficiency,
)
from plait.errors import PlaitError
from plait.scheduler.goodput import GradParams, efficiency


def test_efficiency_and_gain_by_hand() -> None:
    # phi = 59, M0 = 32, M = 128: efficiency (59 + 32) / (59 + 128) = 91 / 187, gain 4 x that
    assert float(noise_scale_efficiency(59.0, 32, 128)) == pytest.approx(91 / 187)
    assert float(noise_scale_gain(59.0, 32, 128)) == pytest.approx(364 / 187)
    # the same from the moments: sqr = 2, var = phi * sqr / M0 = 3.6875; (3.6875 + 2) / (3.6875 / 4 + 2)
    assert float(adascale_gain(2.0, 3.6875, 4.0)) == pytest.approx(5.6875 / 2.921875)
    assert float(statistical_efficiency(2.0, 3.6875, 4.0)) == pytest.approx(91 / 187)
    # GradStats: trace = phi * sqr
    stats = GradStats(sqr=2.0, trace=118.0)
    assert stats.efficiency(32, 128) == pytest.approx(91 / 187)
    assert stats.gain(32, 128) == pytest.approx(364 / 187)


def test_efficiency_limits() -> None:
    assert float(noise_scale_efficiency(0.0, 32, 128)) == pytest.approx(0.25)  # no noise: a 4x batch is worth 1 step
    assert float(noise_scale_gain(0.0, 32, 128)) == pytest.approx(1.0)
    assert float(noise_scale_efficiency(math.inf, 32, 128)) == 1.0  # all noise: perfect scaling
    assert float(noise_scale_gain(math.inf, 32, 128)) == pytest.approx(4.0)
    assert float(noise_scale_efficiency(100.0, 32, 32)) == 1.0
    assert float(adascale_gain(0.0, 0.0, 4.0)) == 1.0  # no statistics yet
    assert float(adascale_gain(-1.0, 2.0, 4.0)) == pytest.approx(4.0)  # a negative |G|^2 estimate counts as 0
    # smaller batches than M0 are more efficient per sample
    assert float(noise_scale_efficiency(10.0, 32, 16)) == pytest.approx(42 / 26)


def test_gain_between_one_and_scale() -> None:
    phi = np.geomspace(1e-3, 1e5, 40)[:, None]
    batch = np.geomspace(32, 32 * 1024, 30)[None, :]
    gain = noise_scale_gain(phi, 32, batch)
    assert gain.shape == (40, 30)
    assert np.all(gain >= 1 - 1e-12) and np.all(gain <= batch / 32 * (1 + 1e-12))
    assert np.all(np.diff(noise_scale_efficiency(phi, 32, batch), axis=1) < 0)  # efficiency falls with the batch


def test_same_numbers_as_the_scheduler_goodput_model() -> None:
    rng = np.random.default_rng(0)
    sqr, var = rng.uniform(0, 5, 50), rng.uniform(0, 50, 50)
    batch = rng.uniform(16, 4096, 50)
    for s, v, m in zip(sqr, var, batch, strict=True):
        sched = GradParams(sqr=float(s), var=float(v))
        assert float(adascale_gain(s, v, m / 64)) == pytest.approx(float(sched.gain(m / 64)), rel=1e-12)
        assert float(statistical_efficiency(s, v, m / 64)) == pytest.approx(float(efficiency(sched, 64, m)), rel=1e-12)


@pytest.mark.parametrize(("call", "match"), [
    (lambda: noise_scale_efficiency(10.0, 0, 64), "init_batch_size"),
    (lambda: noise_scale_efficiency(10.0, 32, 0), "batch_size"),
    (lambda: noise_scale_efficiency(-1.0, 32, 64), "noise scale"),
    (lambda: noise_scale_efficiency(math.nan, 32, 64), "noise scale"),
    (lambda: adascale_gain(1.0, 1.0, -2.0), "scale"),
    (lambda: GradStats(sqr=1.0, trace=1.0).efficiency(32, 0), "batch size"),
    (lambda: lr_factor("adascale", scale=0.0, gain=1.0), "scale"),
    (lambda: lr_factor("adascale", scale=2.0, gain=0.0), "gain"),
    (lambda: lr_factor("auto", scale=2.0, gain=1.5), "resolve"),
    (lambda: resolve_lr_scaling("cubic", "sgd"), "unknown"),
    (lambda: resolve_lr_scaling("auto", "lamb"), "lamb"),
    (lambda: Progress().add(0.0), "gain"),
    (lambda: Progress().epochs(32, 0), "dataset_size"),
])
def test_bad_input_is_a_plait_error(call: Callable[[], object], match: str) -> None:
    with pytest.raises(PlaitError, match=match):
        call()


def test_learning_rate_rules() -> None:
    scale, gain = 4.0, 364 / 187
    assert lr_factor("none", scale=scale, gain=gain) == 1.0
    assert lr_factor("linear", scale=scale, gain=gain) == 4.0
    assert lr_factor("sqrt", scale=scale, gain=gain) == 2.0
    assert lr_factor("adascale", scale=scale, gain=gain) == pytest.approx(1.946524)
    assert lr_factor("adamscale", scale=scale, gain=gain) == pytest.approx(math.sqrt(1.946524))
    assert [resolve_lr_scaling("auto", o) for o in ("sgd", "sgd_nomomentum", "adam", "adamw")] == [
        "adascale", "adascale", "adamscale", "adamscale"]
    assert resolve_lr_scaling("linear", "adamw") == "linear"


def test_progress_counts_scale_invariant_iterations() -> None:
    progress = Progress()
    for gain in (1.0, 1.0, 364 / 187, 4.0):
        progress.add(gain)
    assert progress.steps == 4
    assert progress.iterations == pytest.approx(6 + 364 / 187)
    assert progress.samples(32) == pytest.approx(32 * (6 + 364 / 187))
    assert progress.epochs(32, 64) == pytest.approx((6 + 364 / 187) / 2)
    restored = Progress()
    restored.load_state_dict(progress.state_dict())
    assert restored == progress
