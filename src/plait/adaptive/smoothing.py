"""Gradient statistics smoothed over steps: bias-corrected exponential averages, as Pollux keeps them.

Each step's estimates of ``|G|^2`` and ``tr(Sigma)`` are unbiased but noisy (often negative). They are
averaged separately with an exponential moving average whose decay is per *sample* rather than per step:
a step over ``M`` samples decays the past by ``smoothing ** (M / M0)``, so a job that changes its batch
size keeps the same memory in samples. Starting the average at zero biases it towards zero early on;
dividing by ``1 - prod(decays)`` (the weight the average has collected) removes that bias, as Adam does
for its moments. The noise scale is the ratio of the two averages (a ratio of unbiased means).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from plait.adaptive.noise import GradStats, NormSample, check_batches, estimate
from plait.errors import PlaitError

DEFAULT_SMOOTHING = 0.999  # per reference batch of samples (AdaptDL's default)


@dataclass(kw_only=True)
class ExpAverage:
    """An exponential moving average with bias correction (its value is the weighted mean of what it saw)."""

    biased: float = 0.0  # sum of w_t * x_t with weights summing to ``weight``
    weight: float = 0.0  # 1 - product of the decays so far

    def update(self, value: float, decay: float) -> None:
        """Fold in ``value`` with ``decay`` in [0, 1): the past keeps ``decay`` of its weight."""
        self.biased = decay * self.biased + (1.0 - decay) * value
        self.weight = decay * self.weight + (1.0 - decay)

    @property
    def value(self) -> float:
        """The bias-corrected average (0 before the first update)."""
        return self.biased / self.weight if self.weight > 0 else 0.0


class GradNoiseScale:
    """Smoothed gradient statistics, the noise scale, and the efficiency and gain they imply, updated once per step."""

    def __init__(self, init_batch_size: float, *, smoothing: float = DEFAULT_SMOOTHING) -> None:
        check_batches(init_batch_size)
        if not 0.0 <= smoothing < 1.0:
            raise PlaitError(f"smoothing is {smoothing}; it must be in [0, 1) (0 keeps only the last step)")
        self.init_batch_size = init_batch_size
        self.smoothing = smoothing
        self.sqr = ExpAverage()
        self.trace = ExpAverage()
        self.num_updates = 0
        self.num_skipped = 0

    def update(self, sample: NormSample) -> bool:
        """Fold in one step's norms; False (and nothing changes) when they are not finite."""
        if not sample.finite:
            self.num_skipped += 1
            return False
        step = estimate(sample)
        decay = self.smoothing ** (sample.big_batch / self.init_batch_size)
        self.sqr.update(step.sqr, decay)
        self.trace.update(step.trace, decay)
        self.num_updates += 1
        return True

    @property
    def stats(self) -> GradStats:
        """The smoothed ``|G|^2`` and ``tr(Sigma)`` (both 0, i.e. no information, before the first update)."""
        return GradStats(sqr=self.sqr.value, trace=self.trace.value)

    @property
    def noise_scale(self) -> float:
        """The smoothed noise scale ``tr(Sigma) / |G|^2`` (0 before the first update)."""
        return self.stats.noise_scale

    def gain(self, batch_size: float) -> float:
        """AdaScale gain of a ``batch_size`` step against the initial batch (1 before the first update)."""
        return self.stats.gain(self.init_batch_size, batch_size)

    def efficiency(self, batch_size: float) -> float:
        """Statistical efficiency of ``batch_size`` against the initial batch."""
        return self.stats.efficiency(self.init_batch_size, batch_size)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the averages after a checkpoint or a resize."""
        return {"init_batch_size": self.init_batch_size, "smoothing": self.smoothing,
                "sqr": [self.sqr.biased, self.sqr.weight], "trace": [self.trace.biased, self.trace.weight],
                "num_updates": self.num_updates, "num_skipped": self.num_skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (the initial batch must match: efficiency is relative to it)."""
        if not math.isclose(float(state["init_batch_size"]), float(self.init_batch_size)):
            raise PlaitError(f"the saved statistics are relative to an initial batch of {state['init_batch_size']}, "
                             f"not {self.init_batch_size}; keep the job's initial batch size across restarts")
        self.smoothing = float(state["smoothing"])
        self.sqr = ExpAverage(biased=float(state["sqr"][0]), weight=float(state["sqr"][1]))
        self.trace = ExpAverage(biased=float(state["trace"][0]), weight=float(state["trace"][1]))
        self.num_updates = int(state["num_updates"])
        self.num_skipped = int(state["num_skipped"])
