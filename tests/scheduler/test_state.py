"""The scheduler state machine, driven by queued decisions."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from plait.scheduler.decisions import Allocations, ClusterView, Decision, JobView, SchedulerError
from plait.scheduler.policies.base import JobMode
from plait.scheduler.sim.job import JobSpec
from plait.scheduler.sim.simulator import SimConfig, Simulator
from plait.scheduler.state import JobPhase, SchedulerState, Transition

CLUSTER = ClusterView(num_nodes=2, gpus_per_node=2)


def test_transitions_restarts_and_listeners() -> None:
    state = SchedulerState(CLUSTER)
    seen: list[Transition] = []
    state.listeners.append(seen.append)
    state.submit("a", 0.0)
    state.submit("b", 5.0)
    state.apply(Decision(allocations={"a": (0, 0)}), 60.0)
    assert state.phase("a") is JobPhase.RESTARTING and state.phase("b") is JobPhase.QUEUED
    state.started("a", 90.0)
    changed = state.apply(Decision(allocations={"a": (0, 0), "b": (1,)}), 120.0)
    assert [t.job for t in changed] == ["b"]
    changed = state.apply(Decision(allocations={"b": (0, 1)}), 180.0)
    assert {t.job: t.new for t in changed} == {"a": JobPhase.QUEUED, "b": JobPhase.RESTARTING}
    assert state.num_restarts("a") == 0 and state.num_restarts("b") == 1
    state.apply(Decision(allocations={"a": (1,), "b": (0, 1)}), 240.0)
    assert state.num_restarts("a") == 1  # re-admitted after preemption: a restart
    state.complete("b", 250.0)
    assert state.allocations == {"a": (1,)} and state.active_jobs() == ["a"]
    assert [t.new for t in seen if t.job == "b"] == [JobPhase.QUEUED, JobPhase.RESTARTING, JobPhase.RESTARTING,
                                                     JobPhase.COMPLETED]
    assert seen == state.history


def test_invalid_moves_raise() -> None:
    state = SchedulerState(CLUSTER)
    state.submit("a", 0.0)
    with pytest.raises(SchedulerError, match="already submitted"):
        state.submit("a", 1.0)
    with pytest.raises(SchedulerError, match="not restarting"):
        state.started("a", 1.0)
    with pytest.raises(SchedulerError, match="unknown job"):
        state.apply(Decision(allocations={"x": (0,)}), 1.0)
    with pytest.raises(SchedulerError, match="more than 2 GPUs"):
        state.apply(Decision(allocations={"a": (0, 0, 0)}), 1.0)
    state.complete("a", 2.0)
    with pytest.raises(SchedulerError, match="completed"):
        state.apply(Decision(allocations={"a": (0,)}), 3.0)
    assert JobPhase.COMPLETED.is_terminal and not JobPhase.RUNNING.is_terminal


class ScriptedPolicy:
    """Returns queued decisions, one per round, and records what it saw."""

    name = "scripted"
    job_mode = JobMode.RIGID

    def __init__(self, script: list[dict[str, tuple[int, ...]]]) -> None:
        self.script = script
        self.seen: list[list[str]] = []

    def decide(self, jobs: Sequence[JobView], cluster: ClusterView, current: Allocations, now: float) -> Decision:
        self.seen.append([j.name for j in jobs])
        plan = self.script.pop(0) if self.script else dict(current)
        return Decision(allocations={k: v for k, v in plan.items() if k in {j.name for j in jobs}})


def test_simulator_applies_queued_decisions_through_the_state_machine() -> None:
    specs = [JobSpec(name="a", application="ncf", submission_time=0, num_replicas=1, batch_size=256),
             JobSpec(name="b", application="ncf", submission_time=30, num_replicas=1, batch_size=256)]
    policy = ScriptedPolicy([{"a": (0,)}, {"a": (0,), "b": (1,)}, {"b": (1,)}, {"a": (0, 1), "b": (1,)}])
    sim = Simulator(specs, policy, SimConfig(cluster=CLUSTER))
    result = sim.run()
    phases = [(t.job, t.new) for t in sim.state.history]
    assert phases[:3] == [("a", JobPhase.QUEUED), ("b", JobPhase.QUEUED), ("a", JobPhase.RESTARTING)]
    assert ("a", JobPhase.RUNNING) in phases and ("b", JobPhase.COMPLETED) in phases
    a_phases = [p for j, p in phases if j == "a"]
    assert a_phases[:6] == [JobPhase.QUEUED, JobPhase.RESTARTING, JobPhase.RUNNING, JobPhase.QUEUED,
                            JobPhase.RESTARTING, JobPhase.RUNNING]
    assert policy.seen[0] == ["a", "b"]  # both submitted before the first decision at t=60
    jobs = {j.name: j for j in result.jobs}
    assert jobs["a"].num_restarts == 1 and jobs["b"].num_restarts == 0
    assert all(j.completion_time > j.submission_time for j in result.jobs)
