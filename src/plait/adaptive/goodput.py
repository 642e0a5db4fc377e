"""Goodput = throughput x statistical efficiency, and the batch-size choice that maximises it (Pollux Eq. 13).

Statistical efficiency of a total batch ``M`` relative to the initial batch ``M0`` is
``(phi + M0) / (phi + M)`` with the gradient noise scale ``phi = M0 * var / sqr``. Goodput is
throughput (samples/s, from ``plait.adaptive.throughput``) times efficiency: progress per second in
``M0``-sample steps. ``GoodputModel.optimize`` is the scheduler's sampled search (50 geometric batch
sizes per allocation, as Pollux); ``choose_batch`` is the job's exact search over every
(micro-batch, accumulation) pair its bounds allow, vectorised over the candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from plait.adaptive.efficiency import adascale_gain, statistical_efficiency
from plait.adaptive.noise import GradStats
from plait.adaptive.throughput import FloatArray, IntArray, PerfParams, ThroughputModel, throughput

_EPS = 1e-8  # tolerance for ceil of ratios that should be integers
NUM_BATCH_CANDIDATES = 50
MAX_CANDIDATES = 4_000_000  # (micro-batch, accumulation) pairs choose_batch evaluates at most


@dataclass(frozen=True, kw_only=True)
class GradParams:
    """Gradient statistics at the initial batch: squared norm of the true gradient and noise variance."""

    sqr: float
    var: float

    @classmethod
    def from_stats(cls, stats: GradStats, init_batch_size: float) -> GradParams:
        """From the noise-scale estimator's per-sample statistics: ``var = tr(Sigma) / M0``."""
        return cls(sqr=stats.sqr, var=stats.var(init_batch_size))

    @classmethod
    def from_noise_scale(cls, noise_scale: float, init_batch_size: float) -> GradParams:
        """From a noise scale ``phi`` alone (``sqr = 1``, ``var = phi / M0``)."""
        return cls(sqr=1.0, var=noise_scale / init_batch_size)

    def gain(self, scale: npt.ArrayLike) -> FloatArray:
        """AdaScale gain ``(var + sqr) / (var / scale + sqr)`` of a batch ``scale`` x the initial one (1 if undefined)."""
        return adascale_gain(self.sqr, self.var, scale)


def efficiency(grad: GradParams, init_batch_size: int, batch_size: npt.ArrayLike) -> FloatArray:
    """Statistical efficiency ``(phi + M0) / (phi + M)`` in the AdaScale-gain form ``gain / scale``."""
    return statistical_efficiency(grad.sqr, grad.var, np.asarray(batch_size, dtype=np.float64) / init_batch_size)


@dataclass(frozen=True, kw_only=True)
class BatchLimits:
    """What a job allows for its batch: the largest total batch and the per-replica micro-batch range."""

    max_batch_size: int
    min_local_bsz: int
    max_local_bsz: int
    accumulation: bool = True


class GoodputModel:
    """Goodput of one job for any allocation, and the batch size and accumulation that maximise it."""

    def __init__(self, perf: PerfParams, grad: GradParams, init_batch_size: int) -> None:
        self.perf = perf
        self.grad = grad
        self.init_batch_size = init_batch_size

    def throughput(
        self, num_nodes: npt.ArrayLike, num_replicas: npt.ArrayLike, atomic_bsz: npt.ArrayLike,
        accum_steps: npt.ArrayLike,
    ) -> FloatArray:
        """Samples per second."""
        return throughput(self.perf, num_nodes, num_replicas, atomic_bsz, accum_steps)

    def efficiency(self, batch_size: npt.ArrayLike) -> FloatArray:
        """Statistical efficiency of a total batch relative to the initial batch."""
        return efficiency(self.grad, self.init_batch_size, batch_size)

    def goodput(
        self, num_nodes: npt.ArrayLike, num_replicas: npt.ArrayLike, atomic_bsz: npt.ArrayLike,
        accum_steps: npt.ArrayLike,
    ) -> FloatArray:
        """Throughput times efficiency: M0-equivalent samples of progress per second."""
        batch = np.asarray(num_replicas) * np.asarray(atomic_bsz) * (np.asarray(accum_steps) + 1)
        thr = self.throughput(num_nodes, num_replicas, atomic_bsz, accum_steps)
        return np.asarray(thr * self.efficiency(batch), dtype=np.float64)

    def optimize(
        self, num_nodes: npt.ArrayLike, num_replicas: npt.ArrayLike, limits: BatchLimits
    ) -> tuple[FloatArray, IntArray, IntArray]:
        """Best (goodput, atomic batch, accumulation steps) for each (nodes, replicas) pair.

        Samples 50 total batch sizes geometrically between ``max(M0, K * min_local)`` and the
        largest batch, splits each into micro-batches and accumulation steps, and keeps the best.
        Candidates whose micro-batch falls outside the allowed range score 0.
        """
        nodes, replicas = np.broadcast_arrays(np.asarray(num_nodes), np.asarray(num_replicas))
        shape = nodes.shape
        nodes = nodes.ravel()
        replicas = replicas.ravel().astype(np.float64)
        atomic, accum = candidate_configs(replicas, self.init_batch_size, limits)
        good = self.goodput(nodes, replicas, atomic, accum)
        valid = (atomic >= limits.min_local_bsz) & (atomic <= limits.max_local_bsz)
        good = np.where(valid, good, 0.0)
        best = np.argmax(good, axis=0)
        cols = np.arange(good.shape[1])
        return (good[best, cols].reshape(shape), atomic[best, cols].reshape(shape),
                accum[best, cols].reshape(shape))


def candidate_configs(
    num_replicas: FloatArray, init_batch_size: int, limits: BatchLimits
) -> tuple[IntArray, IntArray]:
    """Candidate (atomic batch, accumulation steps), shape (50, len(num_replicas))."""
    lo = np.maximum(init_batch_size, limits.min_local_bsz * num_replicas)
    batch = np.geomspace(lo, limits.max_batch_size, NUM_BATCH_CANDIDATES)
    local = batch / num_replicas
    if limits.accumulation:
        accum = np.ceil(local / limits.max_local_bsz - _EPS) - 1
        # One replica estimates gradient noise only across micro-batches, so it needs s >= 1.
        single = (num_replicas == 1) & (local > init_batch_size + _EPS)
        accum = np.where(single, np.maximum(accum, 1), accum).astype(np.int64)
    else:
        accum = np.zeros(local.shape, dtype=np.int64)
    atomic = np.ceil(local / (accum + 1) - _EPS).astype(np.int64)
    return atomic, accum


def fixed_batch_config(
    batch_size: int, num_replicas: int, init_batch_size: int, limits: BatchLimits
) -> tuple[int, int]:
    """(atomic batch, accumulation steps) that run a fixed total batch on ``num_replicas`` replicas."""
    local = int(np.ceil(batch_size / num_replicas - _EPS))
    accum = int(np.ceil(local / limits.max_local_bsz - _EPS)) - 1
    if num_replicas == 1 and batch_size > init_batch_size:
        accum = max(1, accum)
    atomic = int(np.ceil(local / (accum + 1) - _EPS))
    return atomic, accum


# ---- the job's choice ---------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class BatchChoice:
    """The chosen global batch, its split into micro-batch and accumulation, and what it is predicted to give."""

    global_batch: int
    local_bsz: int  # samples per replica per micro-step
    accum_steps: int  # non-synchronising micro-steps before the synchronising one
    goodput: float  # M0-equivalent samples of progress per second
    throughput: float  # samples per second
    efficiency: float


def choose_batch(
    model: ThroughputModel | PerfParams,
    grad: GradParams,
    init_batch_size: int,
    num_nodes: int,
    num_replicas: int,
    limits: BatchLimits,
    *,
    max_accum_steps: int | None = None,
    min_accum_steps: int = 0,
) -> BatchChoice:
    """The (global batch, micro-batch, accumulation) that maximises predicted goodput (Pollux Eq. 13).

    Every micro-batch ``m`` in ``[min_local_bsz, max_local_bsz]`` and accumulation ``s`` in
    ``[0, max_accum_steps]`` (0 only without ``limits.accumulation``) whose global batch
    ``K * m * (s + 1)`` lies in ``[max(M0, K * min_local), max_batch_size]`` is evaluated at once. As in
    Pollux, one replica with a batch above ``M0`` accumulates (``s >= 1``) where accumulation is allowed:
    its noise scale is estimated across micro-batches. ``min_accum_steps`` forces at least that many (a Trainer with
    one replica keeps ``s >= 1`` at every batch, so it never loses its estimate). Ties go to the smaller global batch,
    then the fewer micro-steps.
    """
    perf = model.params if isinstance(model, ThroughputModel) else model
    k = int(num_replicas)
    m0 = int(init_batch_size)
    lo_m, hi_m = int(limits.min_local_bsz), int(limits.max_local_bsz)
    if k < 1 or num_nodes < 1 or lo_m < 1 or hi_m < lo_m:
        raise ValueError(f"choose_batch needs replicas, nodes >= 1 and 1 <= min_local <= max_local, got "
                         f"{num_replicas=}, {num_nodes=}, {limits}")
    lo_batch = max(m0, k * lo_m)
    if lo_batch > limits.max_batch_size:
        raise ValueError(f"no batch fits: the smallest is {lo_batch} (M0 or {k} x {lo_m}), "
                         f"the largest allowed {limits.max_batch_size}")
    max_s = limits.max_batch_size // (k * lo_m) - 1 if limits.accumulation else 0
    if max_accum_steps is not None:
        max_s = min(max_s, max_accum_steps)
    max_s = max(max_s, 0)
    if (hi_m - lo_m + 1) * (max_s + 1) > MAX_CANDIDATES:
        raise ValueError("too many (micro-batch, accumulation) candidates; bound max_accum_steps or the local batch")
    m = np.arange(lo_m, hi_m + 1, dtype=np.int64)[:, None]
    s = np.arange(0, max_s + 1, dtype=np.int64)[None, :]
    batch = k * m * (s + 1)
    ok = (batch >= lo_batch) & (batch <= limits.max_batch_size)
    if k == 1 and limits.accumulation:
        ok &= (s >= 1) | (batch <= m0)
    ok &= s >= min_accum_steps
    if not np.any(ok):
        raise ValueError(f"no (micro-batch, accumulation) pair reaches a batch in [{lo_batch}, {limits.max_batch_size}]")
    thr = throughput(perf, num_nodes, k, m, s)
    eff = efficiency(grad, m0, np.maximum(batch, 1))
    good = np.where(ok, thr * eff, -np.inf)
    # lexicographic: best goodput (to 1e-12 relative), then smaller batch, then fewer micro-steps
    top = good >= good.max() * (1 - 1e-12)
    order = np.where(top, batch * (max_s + 2) + s, np.iinfo(np.int64).max)
    i, j = np.unravel_index(int(np.argmin(order)), order.shape)
    return BatchChoice(global_batch=int(batch[i, j]), local_bsz=int(m[i, 0]), accum_steps=int(s[0, j]),
                       goodput=float(good[i, j]), throughput=float(thr[i, j]), efficiency=float(eff[i, j]))
