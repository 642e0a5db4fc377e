"""Trace-driven cluster simulator: fixed-length rounds, a policy decision after each round.

Each round every job with GPUs advances by the interval (first paying any restart delay), using
the true step times and gradient statistics of its application's traces; then submissions,
completions and finished restarts are fed to the scheduler state machine, the policy sees the
active jobs and returns a decision, and jobs whose allocation changed restart on their new GPUs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from plait.scheduler.decisions import ClusterView, Policy, SchedulerError, placement_of
from plait.scheduler.policies.base import JobMode
from plait.scheduler.sim.job import RESTART_DELAY_S, JobSpec
from plait.scheduler.sim.metrics import ScheduleResult, TimelinePoint, summarize
from plait.scheduler.sim.profiles import load_application
from plait.scheduler.sim.views import job_view, make_job
from plait.scheduler.state import JobPhase, SchedulerState

ProgressFn = Callable[[float, int, int], None]  # (simulated time, jobs done, jobs total)
MAX_SIM_TIME_S = 60 * 24 * 3600.0


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """Simulation settings; the defaults are the published setup (16 nodes x 4 GPUs, 60 s rounds)."""

    cluster: ClusterView = ClusterView(num_nodes=16, gpus_per_node=4)
    interval: int = 60
    restart_delay: float = RESTART_DELAY_S
    interference: float = 0.0  # slowdown of multi-node jobs that share a node with another one
    max_time: float = MAX_SIM_TIME_S

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise SchedulerError(f"interval {self.interval} s: the scheduling interval must be >= 1 s")
        if not 0.0 <= self.interference < 1.0:
            raise SchedulerError(f"interference {self.interference}: must be in [0, 1)")


class Simulator:
    """Runs one policy over one workload."""

    def __init__(self, workload: Sequence[JobSpec], policy: Policy, config: SimConfig | None = None,
                 progress: ProgressFn | None = None, workload_name: str = "") -> None:
        self.config = config or SimConfig()
        self.workload_name = workload_name
        self.policy = policy
        self.mode: JobMode = getattr(policy, "job_mode", JobMode.RIGID)
        self.progress = progress
        self.jobs = [make_job(s, load_application(s.application), self.mode, self.config.restart_delay)
                     for s in sorted(workload, key=lambda s: s.submission_time)]
        self.state = SchedulerState(self.config.cluster)
        self.timeline: list[TimelinePoint] = []
        self.now = 0.0
        self._check_fits()

    def _check_fits(self) -> None:
        total = self.config.cluster.total_gpus
        if self.mode is not JobMode.ADAPTIVE:
            for job in self.jobs:
                app, batch = job.app, job.spec.batch_size
                if not app.init_batch_size <= batch <= app.max_batch_size:
                    raise SchedulerError(f"job {job.name}: batch_size {batch} is outside the measured range "
                                         f"{app.init_batch_size}..{app.max_batch_size} of {app.name}")
        if self.mode is JobMode.RIGID:
            big = [j.name for j in self.jobs if j.spec.num_replicas > total]
            if big:
                raise SchedulerError(f"jobs {big[:5]} ask for more GPUs than the {total} of cluster "
                                     f"{self.config.cluster}; use a larger --cluster")

    def run(self) -> ScheduleResult:
        """Simulate until every job completes."""
        start = time.perf_counter()
        rounds = 0
        while not all(j.completion_time is not None for j in self.jobs):
            if self.now >= self.config.max_time:
                raise SchedulerError(f"simulation passed {self.config.max_time:.0f} s without finishing; "
                                     f"policy {self.policy.name} may be starving jobs")
            self.step()
            rounds += 1
        return summarize(self, wall_time_s=time.perf_counter() - start, rounds=rounds)

    def step(self) -> None:
        """Advance one round and apply the policy's decision."""
        interval = self.config.interval
        slowed = self._interfering_jobs()
        for job in self.jobs:
            job.step(self.now, interval, self.config.interference if job.name in slowed else 0.0)
        self.now += interval
        self._sync_state()
        active = [j for j in self.jobs if j.spec.submission_time <= self.now and j.completion_time is None]
        if active:
            views = [job_view(j, self.mode, self.config.cluster, self.now) for j in active]
            current = self.state.allocations
            decision = self.policy.decide(views, self.config.cluster, current, self.now)
            decision.validate(self.config.cluster, views)
            by_name = {j.name: j for j in active}
            for t in self.state.apply(decision, self.now):
                by_name[t.job].reallocate(placement_of(t.allocation))
        self._record(len(active))
        if self.progress is not None:
            done = sum(j.completion_time is not None for j in self.jobs)
            self.progress(self.now, done, len(self.jobs))

    def _sync_state(self) -> None:
        """Tell the state machine about submissions, completions and finished restarts."""
        for job in self.jobs:
            if job.spec.submission_time > self.now:
                break
            name = job.name
            if not self.state.knows(name):
                self.state.submit(name, float(job.spec.submission_time))
            phase = self.state.phase(name)
            if job.completion_time is not None and not phase.is_terminal:
                self.state.complete(name, job.completion_time)
            elif phase is JobPhase.RESTARTING and job.rescale_time <= 0:
                self.state.started(name, self.now)

    def _interfering_jobs(self) -> set[str]:
        """Multi-node jobs that share a node with another multi-node job."""
        if self.config.interference <= 0:
            return set()
        multi = {k: set(v) for k, v in self.state.allocations.items() if len(set(v)) > 1}
        count: dict[int, int] = {}
        for nodes in multi.values():
            for n in nodes:
                count[n] = count.get(n, 0) + 1
        return {k for k, nodes in multi.items() if any(count[n] > 1 for n in nodes)}

    def _record(self, num_active: int) -> None:
        allocs = self.state.allocations
        self.timeline.append(TimelinePoint(time=self.now, used_gpus=sum(len(a) for a in allocs.values()),
                                           running_jobs=len(allocs), active_jobs=num_active))


def simulate_schedule(workload: str | Sequence[JobSpec], policy: str | Policy, *,
                      cluster: str | ClusterView = "16x4", interval: int = 60, seed: int = 0,
                      progress: ProgressFn | None = None) -> ScheduleResult:
    """Simulate ``policy`` (a name or object) on ``workload`` (a CSV path, a packaged name, or job specs)."""
    from plait.scheduler.policies import make_policy
    from plait.scheduler.sim.workload import load_workload, workload_path

    specs = load_workload(workload) if isinstance(workload, str) else list(workload)
    name = workload_path(workload).stem if isinstance(workload, str) else ""
    pol = make_policy(policy, seed=seed) if isinstance(policy, str) else policy
    view = ClusterView.parse(cluster) if isinstance(cluster, str) else cluster
    sim = Simulator(specs, pol, SimConfig(cluster=view, interval=interval), progress=progress, workload_name=name)
    return sim.run()
