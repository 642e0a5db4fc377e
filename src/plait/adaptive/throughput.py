"""One throughput model for a job: Pollux's step-time form, with a CostModel prior refined online.

Step time of one optimizer step with ``s`` accumulation micro-steps of ``m`` samples per replica
(Pollux, OSDI'21 §3.2; the scheduler's goodput model uses these same functions):

    T_grad = alpha_c + beta_c * m
    T_sync = alpha_n + beta_n * (K - 2)   if the job spans more than one node
           = alpha_r + beta_r * (K - 2)   if it has K > 1 replicas on one node
           = ~0                           with one replica
    T_iter = s * T_grad + (T_grad ** gamma + T_sync ** gamma) ** (1 / gamma)

The seven parameters are fitted by bounded least squares on log time (``fit_perf_params``, Pollux's
objective with optional per-point weights). ``ThroughputModel`` is the one performance model of a job:

* its **prior** is plait's own prediction: ``fit_prior`` fits the seven parameters to CostModel (or
  simulator) predictions at a few (nodes, replicas, micro-batch) points, so a job, model-parallel or
  not, is predicted before it has run;
* it is **refined online** from measured step times: the refit minimises the weighted objective over
  the measurements (weight = how many steps each configuration was measured) together with the prior's
  predictions as pseudo-measurements whose weights sum to ``prior_strength`` steps. With no
  measurements the model is the prior; after ``n`` measured steps the prior holds
  ``prior_strength / (prior_strength + n)`` of the weight, so the fit moves to the measurements as they
  accumulate, while configurations never measured stay anchored by the prior's points there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from plait.cost.model import CostModel

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

_TINY = 1e-8  # stands in for "no time" so logs and powers stay finite


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

    def to_array(self) -> FloatArray:
        """The seven numbers in declaration order."""
        return np.array([self.alpha_c, self.beta_c, self.alpha_n, self.beta_n, self.alpha_r, self.beta_r, self.gamma])


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


def sync_step_time(params: PerfParams, num_nodes: npt.ArrayLike, num_replicas: npt.ArrayLike,
                   atomic_bsz: npt.ArrayLike) -> FloatArray:
    """Time of the synchronising micro-step (compute overlapped with gradient sync)."""
    t_grad = grad_time(params, atomic_bsz)
    return np.asarray(np.exp(log_sync_step_time(params.gamma, t_grad, sync_time(params, num_nodes, num_replicas))))


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


def throughput(params: PerfParams, num_nodes: npt.ArrayLike, num_replicas: npt.ArrayLike,
               atomic_bsz: npt.ArrayLike, accum_steps: npt.ArrayLike) -> FloatArray:
    """Samples per second: ``K * m * (s + 1) / T_iter``."""
    batch = np.asarray(num_replicas) * np.asarray(atomic_bsz) * (np.asarray(accum_steps) + 1)
    return np.asarray(batch / iteration_time(params, num_nodes, num_replicas, atomic_bsz, accum_steps),
                      dtype=np.float64)


# ---- fit (Pollux's objective, with optional weights) ------------------------------------------

_LOWER = 1e-8
_START = np.array([1e-1, 1e-2, 1e-1, 1e-2, 1e-1, 1e-2, 1.0 + 1e-3])
_GAMMA_MAX = 10.0
_UPPER = 1e4  # seconds (per sample for betas): far above any step time, keeps the log-space search finite
_REG_GAMMA = 1e-3
_REG_RETRO = 1e-2
REFIT_GROWTH = 0.25  # refit_if_stale: refit once the measured steps grew by this fraction since the last fit
AC, BC, AN, BN, AR, BR, GAMMA = range(7)


class _Data:
    """Measurements as arrays, with the masks the model needs precomputed.

    ``accum_weight`` and ``step_weight`` weight each point's compute-time and step-time residual (default
    1 each: Pollux's unweighted RMS errors); a weight of 0 leaves a time unmeasured.
    """

    def __init__(self, num_nodes: FloatArray, num_replicas: FloatArray, atomic_bsz: FloatArray,
                 accum_time: FloatArray, step_time: FloatArray, accum_weight: FloatArray | None = None,
                 step_weight: FloatArray | None = None) -> None:
        self.bsz = atomic_bsz
        with np.errstate(divide="ignore"):
            self.log_accum = np.log(accum_time)
        self.log_step = np.log(step_time)
        self.inter = num_nodes > 1
        self.intra = ~self.inter & (num_replicas > 1)
        self.retro = np.maximum(num_replicas - 2, 1e-8)
        ones = np.ones(len(atomic_bsz))
        self.w_accum = ones if accum_weight is None else accum_weight
        self.w_step = ones if step_weight is None else step_weight
        # unmeasured compute times (weight 0) must not poison the sums with inf/nan
        self.log_accum = np.where(self.w_accum > 0, self.log_accum, 0.0)


def objective(x: FloatArray, d: _Data) -> tuple[float, FloatArray]:
    """Objective value and its gradient with respect to the seven parameters."""
    ac, bc, an, bn, ar, br, g = x
    t_grad = ac + bc * d.bsz
    alpha = np.where(d.inter, an, np.where(d.intra, ar, 1e-8))
    beta = np.where(d.inter, bn, np.where(d.intra, br, 1e-8))
    t_sync = alpha + beta * d.retro
    pg, sg = t_grad**g, t_sync**g
    total = pg + sg
    log_opt = np.log(total) / g
    grad = np.zeros(7)
    value = 0.0
    # err1: (weighted) RMSE of log compute time.
    n1 = float(d.w_accum.sum())
    r1 = np.log(t_grad) - d.log_accum
    e1 = float(np.sqrt(np.sum(d.w_accum * r1**2) / n1)) if n1 > 0 else 0.0
    if e1 > 0:
        value += e1
        w = d.w_accum * r1 / (n1 * e1) / t_grad
        grad[AC] += w.sum()
        grad[BC] += (w * d.bsz).sum()
    # err2: (weighted) RMSE of log synchronising step time.
    n2 = float(d.w_step.sum())
    r2 = log_opt - d.log_step
    e2 = float(np.sqrt(np.sum(d.w_step * r2**2) / n2)) if n2 > 0 else 0.0
    if e2 > 0:
        value += e2
        w = d.w_step * r2 / (n2 * e2)
        d_grad = w * t_grad ** (g - 1) / total
        d_sync = w * t_sync ** (g - 1) / total
        grad[AC] += d_grad.sum()
        grad[BC] += (d_grad * d.bsz).sum()
        grad[AN] += d_sync[d.inter].sum()
        grad[BN] += (d_sync * d.retro)[d.inter].sum()
        grad[AR] += d_sync[d.intra].sum()
        grad[BR] += (d_sync * d.retro)[d.intra].sum()
        d_gamma = -np.log(total) / g**2 + (pg * np.log(t_grad) + sg * np.log(t_sync)) / (g * total)
        grad[GAMMA] += (w * d_gamma).sum()
    reg = _REG_GAMMA * (g - 1) ** 2 + _REG_RETRO * ((bn / an) ** 2 + (br / ar) ** 2)
    grad[GAMMA] += 2 * _REG_GAMMA * (g - 1)
    grad[BN] += 2 * _REG_RETRO * bn / an**2
    grad[AN] -= 2 * _REG_RETRO * bn**2 / an**3
    grad[BR] += 2 * _REG_RETRO * br / ar**2
    grad[AR] -= 2 * _REG_RETRO * br**2 / ar**3
    return value + reg, grad


def _bounds(d: _Data, nodes: FloatArray, replicas: FloatArray, accum_time: FloatArray,
            ) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Start point and bounds, with unidentifiable parameters pinned (lower == upper)."""
    start = _START.copy()
    lower = np.full(7, _LOWER)
    lower[GAMMA] = 1.0
    upper = np.full(7, _UPPER)
    upper[GAMMA] = _GAMMA_MAX
    pinned: list[int] = []
    measured = d.w_accum > 0
    if len(np.unique(d.bsz)) == 1 and np.any(measured):
        start[AC] = lower[AC] = upper[AC] = float(np.mean(accum_time[measured])) / 2
    if not np.any(nodes > 1):
        pinned += [AN, BN]
    if not np.any((nodes == 1) & (replicas > 1)):
        pinned += [AR, BR]
    if not np.any(replicas > 2):
        pinned += [BN, BR]
    for i in pinned:
        start[i] = upper[i] = lower[i]
    return start, lower, upper


def _minimize(d: _Data, start: FloatArray, lower: FloatArray, upper: FloatArray) -> FloatArray:
    """SLSQP over the free parameters; alphas and betas are searched in log space (they span decades).

    SLSQP reaches the same optima as Pollux's L-BFGS-B here and is about 20x faster per fit.
    """
    free = lower < upper
    logs = np.arange(7) != GAMMA
    x = start.copy()

    def to_x(z: FloatArray) -> FloatArray:
        x[free] = np.where(logs[free], np.exp(z), z)
        return x

    def fun(z: FloatArray) -> tuple[float, FloatArray]:
        value, grad = objective(to_x(z), d)
        return value, (grad * np.where(logs, x, 1.0))[free]

    def to_z(v: FloatArray) -> FloatArray:
        return np.where(logs[free], np.log(v[free]), v[free])

    import scipy.optimize  # here: every rank imports this package, only a fit needs scipy's optimizer (0.3 s)

    with np.errstate(all="ignore"):
        result = scipy.optimize.minimize(fun, to_z(start), jac=True, method="SLSQP",
                                         bounds=list(zip(to_z(lower), to_z(upper), strict=True)))
    return to_x(result.x).copy()


def load_fitter() -> None:
    """Import scipy's optimizer now (0.3 s), so that the first fit in a training loop does not pay for it."""
    import scipy.optimize  # noqa: F401


def fit_perf_params(
    num_nodes: npt.ArrayLike,
    num_replicas: npt.ArrayLike,
    atomic_bsz: npt.ArrayLike,
    accum_time: npt.ArrayLike,
    step_time: npt.ArrayLike,
    *,
    accum_weight: npt.ArrayLike | None = None,
    step_weight: npt.ArrayLike | None = None,
) -> PerfParams:
    """Fit ``PerfParams`` to per-configuration compute (accumulation) times and synchronising step times.

    Each argument holds one value per measured configuration (nodes, replicas, micro-batch). The
    optional weights scale each point's residual (default 1; a compute time with weight 0 is treated as
    not measured and may be any value). After a fit without multi-node points, inter-node terms are
    raised to at least 1.1x the intra-node ones, so going across nodes is never predicted to be free.
    """
    nodes = np.asarray(num_nodes, dtype=np.float64).ravel()
    replicas = np.asarray(num_replicas, dtype=np.float64).ravel()
    bsz = np.asarray(atomic_bsz, dtype=np.float64).ravel()
    t_acc = np.asarray(accum_time, dtype=np.float64).ravel()
    t_step = np.asarray(step_time, dtype=np.float64).ravel()
    if not (len(nodes) == len(replicas) == len(bsz) == len(t_acc) == len(t_step) > 0):
        raise ValueError("fit_perf_params needs the same, non-zero number of values in each argument")
    w_acc = None if accum_weight is None else np.broadcast_to(np.asarray(accum_weight, dtype=np.float64), bsz.shape)
    w_step = None if step_weight is None else np.broadcast_to(np.asarray(step_weight, dtype=np.float64), bsz.shape)
    for w in (w_acc, w_step):
        if w is not None and (np.any(w < 0) or not np.any(w > 0)):
            raise ValueError("fit_perf_params needs non-negative weights, some positive")
    acc_measured = np.ones(len(bsz), dtype=bool) if w_acc is None else w_acc > 0
    if np.any(t_acc[acc_measured] <= 0) or np.any(t_step <= 0):
        raise ValueError("fit_perf_params needs positive measured times")
    d = _Data(nodes, replicas, bsz, t_acc, t_step, w_acc, w_step)
    start, lower, upper = _bounds(d, nodes, replicas, t_acc)
    x = _minimize(d, start, lower, upper)
    if not np.any(nodes > 1):
        x[AN] = max(x[AN], x[AR] * 1.1)
        x[BN] = max(x[BN], x[BR] * 1.1)
    return PerfParams.from_array(x)


# ---- the prior: plait's own prediction -----------------------------------------------------------

StepTimePredictor = Callable[[int, int, int], tuple[float, float]]
"""``(nodes, replicas, micro-batch) -> (compute micro-step seconds, synchronising micro-step seconds)``."""


@dataclass(frozen=True)
class Prior:
    """CostModel predictions at a few configurations and the seven parameters fitted to them."""

    num_nodes: FloatArray
    num_replicas: FloatArray
    atomic_bsz: FloatArray
    accum_time: FloatArray
    step_time: FloatArray
    params: PerfParams


def default_prior_configs(max_nodes: int, devices_per_node: int, local_bsz: Sequence[int],
                          devices_per_replica: int = 1) -> list[tuple[int, int, int]]:
    """(nodes, replicas, micro-batch) points that identify all seven parameters: 1, 2 and a full node's
    replicas on one node, and 2 and ``max_nodes`` full nodes, each at every micro-batch in ``local_bsz``."""
    per_node = max(1, devices_per_node // devices_per_replica)
    shapes = {(1, 1), (1, min(2, per_node)), (1, per_node)}
    if max_nodes > 1:
        shapes |= {(2, 2 * per_node), (max_nodes, max_nodes * per_node)}
    return [(n, k, m) for n, k in sorted(shapes) for m in local_bsz]


def fit_prior(predict: StepTimePredictor, configs: Sequence[tuple[int, int, int]]) -> Prior:
    """Fit the seven parameters to ``predict``'s step times at ``configs`` (nodes, replicas, micro-batch).

    ``predict`` is plait's prediction of the job's plan: ``cost_model_predictor`` for a replicated job
    from the CostModel, or any callable that re-plans and simulates a model-parallel plan.
    """
    if not configs:
        raise ValueError("fit_prior needs at least one configuration")
    a = np.array(configs, dtype=np.float64).reshape(-1, 3)
    times = np.array([predict(int(n), int(k), int(m)) for n, k, m in configs], dtype=np.float64).reshape(-1, 2)
    params = fit_perf_params(a[:, 0], a[:, 1], a[:, 2], times[:, 0], times[:, 1])
    return Prior(a[:, 0], a[:, 1], a[:, 2], times[:, 0], times[:, 1], params)


def cost_model_predictor(
    cost: CostModel,
    *,
    flops_per_sample: float,
    grad_bytes: float,
    num_params: float | None = None,
    bytes_per_sample: float = 0.0,
    kernels_per_step: int = 1,
    devices_per_replica: int = 1,
    dtype: str = "fp32",
) -> StepTimePredictor:
    """Step times of a replicated job from the CostModel.

    One replica spans ``devices_per_replica`` devices (a model-parallel plan's submesh; its FLOPs, bytes and
    gradients split evenly over them). A micro-batch of ``m`` samples costs ``cost.compute_time`` of
    ``m * flops_per_sample`` FLOPs (forward and backward); the synchronising micro-step adds the all-reduce of
    each device's gradient shard across replicas (overlapped with compute where the CostModel says devices
    overlap communication, else added) and the optimizer step.
    """
    d = devices_per_replica
    dpn = cost.cluster.devices_per_node
    if d > dpn:
        raise ValueError(f"a replica of {d} devices does not fit a node of {dpn}")
    params = grad_bytes / 4 if num_params is None else num_params

    def predict(num_nodes: int, num_replicas: int, atomic_bsz: int) -> tuple[float, float]:
        t_grad = cost.compute_time(atomic_bsz * flops_per_sample / d, atomic_bsz * bytes_per_sample / d,
                                   dtype=dtype, num_kernels=kernels_per_step)
        per_node = math.ceil(num_replicas / num_nodes)
        if per_node * d > dpn:
            raise ValueError(f"{num_replicas} replicas of {d} devices do not fit {num_nodes} node(s) of {dpn}")
        group = [(j // per_node) * dpn + (j % per_node) * d for j in range(num_replicas)]
        t_sync = cost.collective_time("all_reduce", grad_bytes / d, group)
        overlapped = max(t_grad, t_sync) if cost.overlaps_comm else t_grad + t_sync
        return t_grad, overlapped + cost.optimizer_time(params / d)

    return predict


# ---- the one model: prior refined online ------------------------------------------------------------

class ThroughputModel:
    """The job's step-time model: a CostModel prior refined by measured step times (see the module doc).

    ``prior_strength`` is how many measured steps the prior is worth: its pseudo-measurements share that
    weight, and each measured configuration weighs as many steps as it was measured.
    """

    def __init__(self, prior: Prior | None = None, *, prior_strength: float = 10.0) -> None:
        if prior_strength <= 0:
            raise ValueError("prior_strength must be positive")
        self.prior = prior
        self.prior_strength = float(prior_strength)
        # (nodes, replicas, micro-batch) -> [steps, sum log step, accum steps, sum log accum]
        self._obs: dict[tuple[int, int, int], list[float]] = {}
        self._params: PerfParams | None = prior.params if prior is not None else None
        self._fitted_on: tuple[frozenset[tuple[int, int, int]], int] = (frozenset(), 0)  # configurations, steps

    @property
    def params(self) -> PerfParams:
        """The current seven parameters (the prior's until a measurement is refitted)."""
        if self._params is None:
            raise ValueError("ThroughputModel has neither a prior nor measurements yet")
        return self._params

    @property
    def num_measured(self) -> int:
        """Measured synchronising steps so far."""
        return int(sum(v[0] for v in self._obs.values()))

    def observe(self, num_nodes: int, num_replicas: int, atomic_bsz: int, step_time: float,
                accum_time: float | None = None, *, count: int = 1) -> None:
        """Record ``count`` measured steps of a configuration: the synchronising micro-step's seconds and,
        with accumulation, a non-synchronising micro-step's seconds (their geometric means are kept)."""
        if step_time <= 0 or (accum_time is not None and accum_time <= 0) or count < 1:
            raise ValueError("observe needs positive times and count")
        rec = self._obs.setdefault((int(num_nodes), int(num_replicas), int(atomic_bsz)), [0.0, 0.0, 0.0, 0.0])
        rec[0] += count
        rec[1] += count * math.log(step_time)
        if accum_time is not None:
            rec[2] += count
            rec[3] += count * math.log(accum_time)

    def observe_iteration(self, num_nodes: int, num_replicas: int, atomic_bsz: int, accum_steps: int,
                          iteration_s: float, accum_s: float | None = None) -> None:
        """Record one whole optimizer step of ``accum_steps`` + 1 micro-steps taking ``iteration_s``; with
        ``accum_s`` (the time of its ``accum_steps`` non-synchronising micro-steps) both parts are kept."""
        if accum_steps > 0 and accum_s is not None:
            self.observe(num_nodes, num_replicas, atomic_bsz, iteration_s - accum_s, accum_s / accum_steps)
        elif accum_steps == 0:
            self.observe(num_nodes, num_replicas, atomic_bsz, iteration_s)
        else:
            raise ValueError("a step with accumulation needs the time of its accumulation micro-steps")

    def observations(self) -> dict[str, list[float]]:
        """The measurements as plain data for a checkpoint: ``"nodes,replicas,micro"`` -> [steps, sum log step
        time, accumulation steps, sum log accumulation time]."""
        return {",".join(map(str, k)): list(v) for k, v in self._obs.items()}

    def load_observations(self, saved: dict[str, list[float]]) -> None:
        """Continue with the measurements ``observations`` returned (the fit is redone by the next ``refit``)."""
        obs: dict[tuple[int, int, int], list[float]] = {}
        for key, rec in saved.items():
            n, k, m = (int(x) for x in key.split(","))
            obs[(n, k, m)] = [float(x) for x in rec]
        self._obs = obs
        self._fitted_on = (frozenset(), 0)

    def refit_if_stale(self, growth: float = REFIT_GROWTH) -> PerfParams:
        """``refit`` when a configuration was measured that the last fit did not see, or the measured steps grew by
        more than ``growth`` since it; else the last fit (more steps of known configurations barely move it, and a
        fit costs milliseconds that every rank waits for)."""
        configs, steps = self._fitted_on
        if self._obs.keys() - configs or self.num_measured > (1.0 + growth) * steps:
            return self.refit()
        return self.params

    def refit(self) -> PerfParams:
        """Weighted fit of measurements and prior pseudo-measurements; the prior itself with no measurements."""
        if not self._obs:
            return self.params
        self._fitted_on = (frozenset(self._obs), self.num_measured)
        keys = np.array(list(self._obs), dtype=np.float64)
        rec = np.array(list(self._obs.values()), dtype=np.float64)
        steps, accs = rec[:, 0], rec[:, 2]
        log_step = rec[:, 1] / steps
        log_acc = np.where(accs > 0, rec[:, 3] / np.maximum(accs, 1), 0.0)
        nodes, reps, bsz = keys[:, 0], keys[:, 1], keys[:, 2]
        t_step, t_acc = np.exp(log_step), np.exp(log_acc)
        w_step, w_acc = steps, accs
        if self.prior is not None:
            p = self.prior
            w0 = np.full(len(p.atomic_bsz), self.prior_strength / len(p.atomic_bsz))
            nodes, reps, bsz = (np.concatenate([a, b]) for a, b in
                                ((nodes, p.num_nodes), (reps, p.num_replicas), (bsz, p.atomic_bsz)))
            t_step, t_acc = np.concatenate([t_step, p.step_time]), np.concatenate([t_acc, p.accum_time])
            w_step, w_acc = np.concatenate([w_step, w0]), np.concatenate([w_acc, w0])
        elif not np.any(w_acc > 0):  # Pollux without a prior: a step without accumulation is all compute
            t_acc, w_acc = t_step, np.ones_like(w_step)
        self._params = fit_perf_params(nodes, reps, bsz, t_acc, t_step, accum_weight=w_acc, step_weight=w_step)
        return self._params

    def iteration_time(self, num_nodes: npt.ArrayLike, num_replicas: npt.ArrayLike, atomic_bsz: npt.ArrayLike,
                       accum_steps: npt.ArrayLike) -> FloatArray:
        """Predicted seconds per optimizer step."""
        return iteration_time(self.params, num_nodes, num_replicas, atomic_bsz, accum_steps)

    def throughput(self, num_nodes: npt.ArrayLike, num_replicas: npt.ArrayLike, atomic_bsz: npt.ArrayLike,
                   accum_steps: npt.ArrayLike) -> FloatArray:
        """Predicted samples per second."""
        return throughput(self.params, num_nodes, num_replicas, atomic_bsz, accum_steps)
