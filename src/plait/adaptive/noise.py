"""Unbiased gradient statistics from squared gradient norms at two batch sizes (McCandlish et al. 2018, App. A).

A gradient averaged over ``b`` i.i.d. samples has expected squared norm ``|G|^2 + tr(Sigma) / b``, where
``G`` is the true gradient and ``Sigma`` the covariance of one sample's gradient. A step of data-parallel
training (or of gradient accumulation) already holds that quantity at two batch sizes:

* ``L``: the mean, over the local gradients, of their squared norms (each local gradient averages
  ``b_small`` samples: one rank's share, one micro-batch);
* ``S``: the squared norm of the synchronised gradient, which averages ``b_big`` samples.

Solving the two expectations for the unknowns gives estimators that are unbiased because they are linear
in ``L`` and ``S`` (whatever the correlation between the two):

    |G|^2    ~ (b_big * S - b_small * L) / (b_big - b_small)
    tr(Sigma) ~ b_small * b_big * (L - S) / (b_big - b_small)

Their ratio ``tr(Sigma) / |G|^2`` is the (simple) gradient noise scale, Pollux's ``phi``. Single steps are
very noisy; ``plait.adaptive.smoothing`` averages the two estimates over steps before taking the ratio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from plait.adaptive.efficiency import adascale_gain, statistical_efficiency
from plait.errors import PlaitError


@dataclass(frozen=True, kw_only=True)
class NormSample:
    """One step's squared gradient norms at two batch sizes: the input of the two-batch estimator.

    Norms are of *mean* gradients (the gradient of the mean loss over the samples). A gradient that the
    runtime holds scaled (for example ``grad / num_micro`` after the first of ``num_micro`` accumulated
    micro-batches) must be rescaled first: its squared norm times ``num_micro ** 2``.
    """

    small_batch: float  # samples behind each local gradient
    small_sqnorm: float  # mean over the local gradients of their squared norms
    big_batch: float  # samples behind the synchronised gradient
    big_sqnorm: float  # squared norm of the synchronised gradient

    def __post_init__(self) -> None:
        check_batches(self.small_batch, self.big_batch)
        for name in ("small_sqnorm", "big_sqnorm"):
            value = getattr(self, name)
            if value < 0:  # a NaN passes: a non-finite step is skipped by the smoother, not an input error
                raise PlaitError(f"{name} is {value}, but a squared norm cannot be negative; pass sums of squares")

    @property
    def finite(self) -> bool:
        """True when both norms are finite (an overflowed mixed-precision step is not)."""
        return math.isfinite(self.small_sqnorm) and math.isfinite(self.big_sqnorm)

    @classmethod
    def from_norms(cls, local_sqnorms: Sequence[float], local_batch: float, synced_sqnorm: float,
                   synced_batch: float) -> NormSample:
        """A sample from each local gradient's squared norm (e.g. gathered per rank) and the synchronised one."""
        if not local_sqnorms:
            raise PlaitError("no local squared norms were given; pass one per local gradient (rank or micro-batch)")
        mean = math.fsum(float(v) for v in local_sqnorms) / len(local_sqnorms)
        return cls(small_batch=local_batch, small_sqnorm=mean, big_batch=synced_batch, big_sqnorm=synced_sqnorm)


@dataclass(frozen=True, kw_only=True)
class GradStats:
    """Per-sample gradient statistics: the true gradient's squared norm and the trace of one sample's covariance."""

    sqr: float  # |G|^2
    trace: float  # tr(Sigma), Sigma the covariance of a single sample's gradient

    @property
    def noise_scale(self) -> float:
        """The gradient noise scale ``tr(Sigma) / |G|^2`` (Pollux's phi, McCandlish's B_simple), clamped to [0, inf]."""
        sqr, trace = max(self.sqr, 0.0), max(self.trace, 0.0)
        if trace == 0.0:
            return 0.0
        return math.inf if sqr == 0.0 else trace / sqr

    def var(self, batch_size: float) -> float:
        """Variance ``tr(Sigma) / batch_size`` of a gradient averaged over ``batch_size`` samples."""
        check_batches(batch_size)
        return self.trace / batch_size

    def gain(self, init_batch_size: float, batch_size: float) -> float:
        """AdaScale gain of a ``batch_size`` step against ``init_batch_size`` (``plait.adaptive.efficiency``)."""
        return float(adascale_gain(self.sqr, self.var(init_batch_size), batch_size / init_batch_size))

    def efficiency(self, init_batch_size: float, batch_size: float) -> float:
        """Statistical efficiency ``(phi + M0) / (phi + M)`` of ``batch_size`` against ``init_batch_size``."""
        check_batches(batch_size)
        return float(statistical_efficiency(self.sqr, self.var(init_batch_size), batch_size / init_batch_size))


def check_batches(*sizes: float) -> None:
    """Raise ``PlaitError`` unless every size is a positive finite number and, for two, the second is larger."""
    for size in sizes:
        if not (math.isfinite(size) and size > 0):
            raise PlaitError(f"batch size {size} must be a positive number of samples")
    if len(sizes) == 2 and not sizes[1] > sizes[0]:
        raise PlaitError(f"the synchronised gradient's batch ({sizes[1]}) must be larger than the local gradients' "
                         f"({sizes[0]}); with one rank, estimate over two or more accumulated micro-batches")


def estimate(sample: NormSample) -> GradStats:
    """Unbiased single-step estimates of ``|G|^2`` and ``tr(Sigma)`` (either may be negative on a noisy step)."""
    b, big = sample.small_batch, sample.big_batch
    small_sq, big_sq = sample.small_sqnorm, sample.big_sqnorm
    sqr = (big * big_sq - b * small_sq) / (big - b)
    trace = b * big * (small_sq - big_sq) / (big - b)
    return GradStats(sqr=sqr, trace=trace)


def expected_sqnorm(stats: GradStats, batch_size: float) -> float:
    """Expected squared norm ``|G|^2 + tr(Sigma) / b`` of a gradient averaged over ``batch_size`` samples."""
    return stats.sqr + stats.var(batch_size)
