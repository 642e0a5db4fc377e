"""A simulated training job: trace-driven progress, epochs, restarts and an online-fitted goodput model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from plait.scheduler.fit import fit_perf_params
from plait.scheduler.goodput import GoodputModel, GradParams, PerfParams, fixed_batch_config
from plait.scheduler.sim.profiles import Application

RESTART_DELAY_S = 30  # checkpoint-restart time charged to every (re)allocation


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """One row of a workload: what was submitted and when."""

    name: str
    application: str
    submission_time: int
    num_replicas: int  # GPUs a rigid (TunedJobs) scheduler gives the job
    batch_size: int  # total batch a fixed-batch scheduler uses


class SimJob:
    """State of one job in the simulator; its 'truth' comes from the application traces.

    ``target_batch_size`` fixes the total batch (baselines, and Pollux for ncf); ``None`` lets the
    job pick batch size and accumulation from its own fitted goodput model at every epoch boundary
    and reallocation, as Pollux's agent does.
    """

    def __init__(self, spec: JobSpec, app: Application, *, target_batch_size: int | None,
                 learn: bool, restart_delay: float = RESTART_DELAY_S) -> None:
        self.spec = spec
        self.app = app
        self.target_batch_size = target_batch_size
        self.learn = learn
        self.restart_delay = restart_delay
        self.placement: tuple[int, ...] = ()
        self.atomic_bsz = 0
        self.accum_steps = 0
        self.epoch = 0
        self.progress = 0.0
        self.attained_service = 0.0
        self.rescale_time = 0.0
        self.num_restarts: int | None = None
        self.completion_time: float | None = None
        self.perf_params: PerfParams | None = None
        self.grad_params: GradParams | None = None
        self.profile: dict[tuple[int, int, int], tuple[float, float]] = {}

    @property
    def name(self) -> str:
        """The job's name in the workload."""
        return self.spec.name

    @property
    def num_replicas(self) -> int:
        """GPUs the job holds now."""
        return sum(self.placement)

    @property
    def batch_size(self) -> int:
        """Total batch of the current configuration."""
        return self.num_replicas * self.atomic_bsz * (self.accum_steps + 1)

    @property
    def max_profiled_replicas(self) -> int:
        """Most replicas the job has been measured on."""
        return max((k[1] for k in self.profile), default=0)

    def goodput_model(self) -> GoodputModel | None:
        """The job's fitted goodput model, or None before its first measurement."""
        if self.perf_params is None or self.grad_params is None:
            return None
        return GoodputModel(self.perf_params, self.grad_params, self.app.init_batch_size)

    def update_batch(self) -> None:
        """Choose micro-batch and accumulation for the current placement."""
        app = self.app
        num_nodes, num_replicas = len(self.placement), self.num_replicas
        model = self.goodput_model()
        if self.target_batch_size is None and model is not None:
            _, atomic, accum = model.optimize(num_nodes, num_replicas, app.limits())
            self.atomic_bsz, self.accum_steps = int(atomic), int(accum)
        else:
            batch = self.target_batch_size
            if batch is None:  # nothing measured yet: the smallest batch the replicas can run
                batch = max(app.init_batch_size, app.min_local_bsz * num_replicas)
            self.atomic_bsz, self.accum_steps = fixed_batch_config(
                batch, num_replicas, app.init_batch_size, app.limits())
        self.atomic_bsz = app.cap_local_bsz(self.atomic_bsz, num_replicas, self.accum_steps)

    def reallocate(self, placement: tuple[int, ...]) -> None:
        """Move to ``placement`` (GPUs per node, no zeros); empty means preempted."""
        if placement:
            self.placement = placement
            self.update_batch()
            self.rescale_time = self.restart_delay
            self.num_restarts = 0 if self.num_restarts is None else self.num_restarts + 1
        else:
            self.placement = ()
            self.atomic_bsz = 0

    def _observe(self, step_time: float, sync_time: float, grad: tuple[float, float]) -> None:
        self.grad_params = GradParams(sqr=grad[0], var=grad[1])
        key = (len(self.placement), self.num_replicas, self.atomic_bsz)
        if not self.learn or key in self.profile:
            return
        self.profile[key] = (step_time, sync_time)
        k = np.array(list(self.profile), dtype=np.float64)
        v = np.array(list(self.profile.values()), dtype=np.float64)
        self.perf_params = fit_perf_params(k[:, 0], k[:, 1], k[:, 2], v[:, 0] - v[:, 1], v[:, 0])

    def step(self, now: float, seconds: float, slowdown: float = 0.0) -> None:
        """Advance the job by ``seconds`` starting at time ``now``."""
        if not self.placement:
            return
        delay = min(self.rescale_time, seconds)
        now += delay
        self.attained_service += delay * self.num_replicas
        self.rescale_time -= delay
        seconds -= delay
        while seconds > 0 and self.completion_time is None:
            elapsed = self._run_epoch_part(now, seconds, slowdown)
            now += elapsed
            seconds -= elapsed
            self.update_batch()

    def _run_epoch_part(self, now: float, seconds: float, slowdown: float) -> float:
        """Run until the next epoch boundary or for ``seconds``; returns the time used."""
        app = self.app
        batch = self.batch_size
        step_time, sync_time = app.throughput(self.placement, self.atomic_bsz)
        self._observe(step_time, sync_time, app.grad_stats(batch, self.epoch))
        total_time = app.step_time(self.placement, self.atomic_bsz, self.accum_steps)
        goodput = app.gain(batch, self.epoch) / total_time * (1.0 - slowdown)
        next_progress = app.progress(self.epoch + 1)
        if self.progress + goodput * seconds < next_progress:
            self.progress += goodput * seconds
            self.attained_service += seconds * self.num_replicas
            return seconds
        self.epoch += 1
        delta = round(float((next_progress - self.progress) / goodput))
        if self.epoch >= app.max_epochs:
            self.completion_time = now + delta
        self.progress = next_progress
        self.attained_service += delta * self.num_replicas
        return delta
