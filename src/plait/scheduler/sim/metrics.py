"""Simulation outcome: per-job JCTs, average JCT, makespan, finish-time fairness, GPU utilisation."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from plait.scheduler.goodput import candidate_configs, fixed_batch_config
from plait.scheduler.policies.base import JobMode
from plait.scheduler.sim.job import SimJob
from plait.scheduler.sim.profiles import Application, TraceError, load_application, packed_placement
from plait.scheduler.sim.views import ADAPTIVE_PINNED
from plait.serde import to_dict

if TYPE_CHECKING:
    from plait.scheduler.sim.simulator import Simulator


@dataclass(frozen=True, kw_only=True)
class TimelinePoint:
    """Cluster state right after the decision at ``time`` (held until the next round)."""

    time: float
    used_gpus: int
    running_jobs: int
    active_jobs: int


@dataclass(frozen=True, kw_only=True)
class JobResult:
    """One job's outcome."""

    name: str
    application: str
    submission_time: float
    completion_time: float
    jct: float
    num_restarts: int
    gpu_seconds: float
    isolated_jct: float  # run alone on an exclusive 1/N share of the cluster (N: jobs around it)
    ftf: float  # finish-time fairness rho = jct / isolated_jct


@dataclass(frozen=True, kw_only=True)
class ScheduleResult:
    """Everything one simulation produced."""

    policy: str
    workload: str
    cluster: str
    interval: int
    jobs: tuple[JobResult, ...]
    avg_jct: float
    median_jct: float
    p99_jct: float
    makespan: float
    gpu_utilization: float  # allocated GPU-time / (GPUs x makespan)
    ftf_max: float
    ftf_frac_below_2: float
    total_restarts: int
    rounds: int
    wall_time_s: float
    timeline: tuple[TimelinePoint, ...]

    def jcts(self) -> dict[str, float]:
        """Job name -> JCT in seconds."""
        return {j.name: j.jct for j in self.jobs}

    def as_dict(self, *, with_timeline: bool = True) -> dict[str, Any]:
        """The result as plain JSON data, with ``jct_by_job`` (job name -> JCT) added."""
        data: dict[str, Any] = to_dict(self)
        data["jct_by_job"] = self.jcts()
        if not with_timeline:
            data.pop("timeline")
        return data


def write_results_json(results: Sequence[ScheduleResult], path: str | Path, *, with_timeline: bool = True) -> None:
    """Write results as JSON: one result as an object, several as ``{"results": [...]}``."""
    data = [r.as_dict(with_timeline=with_timeline) for r in results]
    Path(path).write_text(json.dumps(data[0] if len(data) == 1 else {"results": data}, indent=1))


def summarize(sim: Simulator, *, wall_time_s: float, rounds: int) -> ScheduleResult:
    """Collect the results of a finished simulation."""
    total = sim.config.cluster.total_gpus
    timeline = tuple(sim.timeline)
    makespan = max(float(j.completion_time or 0.0) for j in sim.jobs)
    gpn = sim.config.cluster.gpus_per_node
    jobs = tuple(_job_result(j, sim.mode, timeline, total, gpn) for j in sim.jobs)
    jct = np.array([j.jct for j in jobs])
    ftf = np.array([j.ftf for j in jobs])
    return ScheduleResult(
        policy=sim.policy.name, workload=sim.workload_name, cluster=str(sim.config.cluster),
        interval=sim.config.interval, jobs=jobs, avg_jct=float(jct.mean()), median_jct=float(np.median(jct)),
        p99_jct=float(np.percentile(jct, 99)), makespan=makespan,
        gpu_utilization=_utilization(timeline, sim.config.interval, makespan, total),
        ftf_max=float(ftf.max()), ftf_frac_below_2=float((ftf < 2).mean()),
        total_restarts=sum(j.num_restarts for j in jobs), rounds=rounds, wall_time_s=wall_time_s,
        timeline=timeline)


def _utilization(timeline: tuple[TimelinePoint, ...], interval: int, makespan: float, total: int) -> float:
    if makespan <= 0:
        return 0.0
    held = sum(p.used_gpus * max(0.0, min(interval, makespan - p.time)) for p in timeline)
    return held / (total * makespan)


def _job_result(job: SimJob, mode: JobMode, timeline: tuple[TimelinePoint, ...], total: int,
                gpus_per_node: int) -> JobResult:
    spec = job.spec
    done = float(job.completion_time or 0.0)
    around = [p.active_jobs for p in timeline if spec.submission_time <= p.time < done]
    share = max(1, int(total / max(1.0, float(np.mean(around)) if around else 1.0)))
    iso = isolated_jct(spec.application, mode, spec.num_replicas, spec.batch_size, share, gpus_per_node)
    jct = done - spec.submission_time
    return JobResult(name=spec.name, application=spec.application, submission_time=float(spec.submission_time),
                     completion_time=done, jct=jct, num_restarts=job.num_restarts or 0,
                     gpu_seconds=job.attained_service, isolated_jct=iso, ftf=jct / iso if iso > 0 else 1.0)


@cache
def isolated_jct(application: str, mode: JobMode, num_replicas: int, batch_size: int, share: int,
                 gpus_per_node: int = 4) -> float:
    """Seconds a job needs alone on ``share`` GPUs packed onto full nodes, with no restarts.

    Rigid jobs use at most their requested GPUs, fixed-batch jobs at most batch / min micro-batch,
    and adaptive jobs pick, every epoch, the batch with the best true goodput.
    """
    app = load_application(application)
    if mode is JobMode.ADAPTIVE and application not in ADAPTIVE_PINNED:
        k = min(share, app.max_batch_size // app.min_local_bsz)
        return _isolated_adaptive(app, k, gpus_per_node)
    if mode is JobMode.ADAPTIVE:
        batch, cap = ADAPTIVE_PINNED[application]
    else:
        batch = batch_size
        cap = num_replicas if mode is JobMode.RIGID else batch // app.min_local_bsz
    k = max(1, min(share, cap))
    atomic, accum = fixed_batch_config(batch, k, app.init_batch_size, app.limits())
    atomic = app.cap_local_bsz(atomic, k, accum)
    step = app.step_time(packed_placement(k, gpus_per_node), atomic, accum)
    real_batch = k * atomic * (accum + 1)
    return sum(_epoch_work(app, e) / (app.gain(real_batch, e) / step) for e in range(app.max_epochs))


def _isolated_adaptive(app: Application, k: int, gpus_per_node: int) -> float:
    atomic, accum = candidate_configs(np.array([float(k)]), app.init_batch_size, app.limits())
    placement = packed_placement(k, gpus_per_node)
    options = []
    for a, s in zip(atomic[:, 0], accum[:, 0], strict=True):
        if not app.min_local_bsz <= a <= app.max_local_bsz:
            continue
        try:
            options.append((k * int(a) * (int(s) + 1), app.step_time(placement, int(a), int(s))))
        except TraceError:
            continue
    total = 0.0
    for e in range(app.max_epochs):
        best = max(app.gain(b, e) / t for b, t in options if b <= app.max_batch_size)
        total += _epoch_work(app, e) / best
    return total


def _epoch_work(app: Application, epoch: int) -> float:
    return app.progress(epoch + 1) - app.progress(epoch)
