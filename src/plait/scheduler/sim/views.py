"""How the simulator configures jobs for a policy's job mode and shows them to the policy."""

from __future__ import annotations

from dataclasses import replace

from plait.scheduler.decisions import ClusterView, JobView
from plait.scheduler.goodput import fixed_batch_config
from plait.scheduler.policies.base import JobMode
from plait.scheduler.sim.job import JobSpec, SimJob
from plait.scheduler.sim.profiles import Application, packed_placement

# Pollux keeps ncf (recommendation, huge batches) at its largest batch on one GPU, as the artifact does.
ADAPTIVE_PINNED: dict[str, tuple[int, int]] = {"ncf": (32768, 1)}


def make_job(spec: JobSpec, app: Application, mode: JobMode, restart_delay: float) -> SimJob:
    """A simulated job configured as ``mode`` requires."""
    if mode is JobMode.ADAPTIVE:
        target = ADAPTIVE_PINNED[spec.application][0] if spec.application in ADAPTIVE_PINNED else None
        return SimJob(spec, app, target_batch_size=target, learn=True, restart_delay=restart_delay)
    return SimJob(spec, app, target_batch_size=spec.batch_size, learn=False, restart_delay=restart_delay)


class TraceOracle:
    """Exact step times and remaining steps of a fixed-batch job, read from its traces."""

    def __init__(self, job: SimJob, gpus_per_node: int) -> None:
        self._job = job
        self._gpn = gpus_per_node

    def remaining_steps(self) -> float:
        """Steps left at the fixed batch, counted from the end of the current epoch as the artifact does."""
        job, app = self._job, self._job.app
        batch = job.target_batch_size
        assert batch is not None
        last = app.max_epochs - 1
        if last <= job.epoch:
            return 1.0
        return app.iterations(batch, last) - app.iterations(batch, job.epoch)

    def step_time(self, num_replicas: int) -> float:
        """True seconds per optimizer step on ``num_replicas`` GPUs packed onto full nodes."""
        job, app = self._job, self._job.app
        batch = job.target_batch_size
        assert batch is not None
        atomic, accum = fixed_batch_config(batch, num_replicas, app.init_batch_size, app.limits())
        if num_replicas == 1:  # the artifact's Optimus always accumulates on one GPU
            accum = max(1, accum)
            atomic = -(-batch // (accum + 1))
        atomic = app.cap_local_bsz(atomic, num_replicas, accum)
        return app.step_time(packed_placement(num_replicas, self._gpn), atomic, accum)


def job_view(job: SimJob, mode: JobMode, cluster: ClusterView, now: float) -> JobView:
    """What the policy sees of ``job`` at time ``now``."""
    spec, app = job.spec, job.app
    view = JobView(name=spec.name, submission_time=float(spec.submission_time), age=now - spec.submission_time,
                   attained_service=job.attained_service, num_restarts=job.num_restarts or 0,
                   max_replicas=spec.num_replicas)
    if mode is JobMode.RIGID:
        return replace(view, requested_replicas=spec.num_replicas, batch_size=spec.batch_size)
    if mode is JobMode.FIXED_BATCH:
        cap = 1 if spec.application in ADAPTIVE_PINNED else spec.batch_size // app.min_local_bsz
        return replace(view, max_replicas=cap, batch_size=spec.batch_size, limits=app.limits(),
                       oracle=TraceOracle(job, cluster.gpus_per_node))
    if spec.application in ADAPTIVE_PINNED:
        cap = ADAPTIVE_PINNED[spec.application][1]
    else:
        cap = min(max(2 * job.max_profiled_replicas, 1), cluster.total_gpus,
                  app.max_batch_size // app.min_local_bsz)
    return replace(view, max_replicas=cap, batch_size=job.target_batch_size, goodput=job.goodput_model(),
                   limits=app.limits())
