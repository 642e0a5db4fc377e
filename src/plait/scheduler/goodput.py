"""Pollux's per-job goodput model: a 7-parameter step-time model times statistical efficiency.

Step time of one optimizer step with ``s`` accumulation micro-steps of ``m`` samples per replica:

    T_grad = alpha_c + beta_c * m
    T_sync = alpha_n + beta_n * (K - 2)   if the job spans more than one node
           = alpha_r + beta_r * (K - 2)   if it has K > 1 replicas on one node
           = ~0                           with one replica
    T_iter = s * T_grad + (T_grad ** gamma + T_sync ** gamma) ** (1 / gamma)

Statistical efficiency of a total batch ``M`` relative to the initial batch ``M0`` is
``(phi + M0) / (phi + M)`` with the gradient noise scale ``phi = M0 * var / sqr``. Goodput is
throughput (samples/s) times efficiency: progress per second in ``M0``-sample steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from plait.adaptive.efficiency import adascale_gain, statistical_efficiency

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

_TINY = 1e-8  # stands in for "no time" so logs and powers stay finite
_EPS = 1e-8  # tolerance for ceil of ratios that should be integers
NUM_BATCH_CANDIDATES = 50


@dataclass(frozen=True, kw_only=True)
class PerfParams:
    """The seven step-time parameters (seconds, seconds per sample, and the overlap exponent)."""

    alpha_c: float
    beta_c: float
    alpha_n: float
    beta_n: float
    alpha_r: float
    beta_r: float
    gamma: float

    @classmethod
    def from_array(cls, values: npt.ArrayLike) -> PerfParams:
        """Build from seven numbers in declaration order."""
        a = [float(v) for v in np.asarray(values, dtype=np.float64).ravel()]
        if len(a) != 7:
            raise ValueError(f"PerfParams needs 7 values, got {len(a)}")
        return cls(alpha_c=a[0], beta_c=a[1], alpha_n=a[2], beta_n=a[3], alpha_r=a[4], beta_r=a[5], gamma=a[6])


@dataclass(frozen=True, kw_only=True)
class GradParams:
    """Gradient statistics at the initial batch: squared norm of the true gradient and noise variance."""

    sqr: float
    var: float

    def gain(self, scale: npt.ArrayLike) -> FloatArray:
        """AdaScale gain ``(var + sqr) / (var / scale + sqr)`` of a batch ``scale`` x the initial one (1 if undefined)."""
        return adascale_gain(self.sqr, self.var, scale)


def grad_time(params: PerfParams, atomic_bsz: npt.ArrayLike) -> FloatArray:
    """Time of one forward/backward micro-batch of ``atomic_bsz`` samples per replica."""
    return params.alpha_c + params.beta_c * np.asarray(atomic_bsz, dtype=np.float64)


def sync_time(params: PerfParams, num_nodes: npt.ArrayLike, num_replicas: npt.ArrayLike) -> FloatArray:
    """Gradient synchronisation time for ``num_replicas`` replicas spread over ``num_nodes`` nodes."""
    nodes = np.asarray(num_nodes)
    replicas = np.asarray(num_replicas)
    conds = [nodes > 1, replicas > 1]
    alpha = np.select(conds, [params.alpha_n, params.alpha_r], _TINY)
    beta = np.select(conds, [params.beta_n, params.beta_r], _TINY)
    return np.asarray(alpha + beta * np.maximum(replicas - 2, _TINY), dtype=np.float64)


def log_sync_step_time(gamma: float, t_grad: FloatArray, t_sync: FloatArray) -> FloatArray:
    """Log of the synchronising step's time, the gamma-norm of compute and sync time."""
    return np.asarray(np.log(t_grad**gamma + t_sync**gamma) / gamma, dtype=np.float64)


def iteration_time(
    params: PerfParams,
    num_nodes: npt.ArrayLike,
    num_replicas: npt.ArrayLike,
    atomic_bsz: npt.ArrayLike,
    accum_steps: npt.ArrayLike,
) -> FloatArray:
    """Seconds per optimizer step: ``s * T_grad + (T_grad^gamma + T_sync^gamma)^(1/gamma)``."""
    t_grad = grad_time(params, atomic_bsz)
    t_sync = sync_time(params, num_nodes, num_replicas)
    t_opt = np.exp(log_sync_step_time(params.gamma, t_grad, t_sync))
    return np.asarray(np.asarray(accum_steps) * t_grad + t_opt, dtype=np.float64)


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
        batch = np.asarray(num_replicas) * np.asarray(atomic_bsz) * (np.asarray(accum_steps) + 1)
        return batch / iteration_time(self.perf, num_nodes, num_replicas, atomic_bsz, accum_steps)

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
