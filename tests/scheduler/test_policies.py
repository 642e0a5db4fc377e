"""Policies on small hand-checkable cases: Pollux (against brute force), Optimus, Tiresias, FIFO."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from plait.scheduler.decisions import ClusterView, Decision, JobView, SchedulerError
from plait.scheduler.goodput import BatchLimits, GoodputModel, GradParams, PerfParams
from plait.scheduler.policies import FifoPolicy, OptimusPolicy, PolluxPolicy, TiresiasPolicy, make_policy

PERF = PerfParams(alpha_c=0.02, beta_c=0.001, alpha_n=0.08, beta_n=0.01, alpha_r=0.01, beta_r=0.002, gamma=1.5)
LIMITS = BatchLimits(max_batch_size=2048, min_local_bsz=16, max_local_bsz=256)


def _view(name: str, **kw) -> JobView:  # type: ignore[no-untyped-def]
    base = {"name": name, "submission_time": 0.0, "age": 600.0, "attained_service": 0.0, "num_restarts": 0,
            "max_replicas": 4}
    base.update(kw)
    return JobView(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("current", [{"j0": (0,), "j2": (1, 1)}, {}, {"j0": (0, 1)}])
def test_pollux_matches_brute_force_on_a_small_cluster(current: dict[str, tuple[int, ...]]) -> None:
    cluster = ClusterView(num_nodes=2, gpus_per_node=2)
    noise = [1e4, 10.0, 0.5]  # very scalable, somewhat, hardly
    jobs = [_view(f"j{i}", attained_service=float(i), age=300.0 + 100 * i, num_restarts=i,
                  goodput=GoodputModel(PERF, GradParams(sqr=1.0, var=v), 64), limits=LIMITS)
            for i, v in enumerate(noise)]
    decision = PolluxPolicy(seed=0).decide(jobs, cluster, current, now=1000.0)
    decision.validate(cluster, jobs)
    fair = math.ceil(4 / 3)

    def speedup(j: JobView, nodes: int, k: int) -> float:
        if k == 0:
            return 0.0
        assert j.goodput is not None
        g = float(j.goodput.optimize(nodes, k, LIMITS)[0])
        return g / float(j.goodput.optimize(1, fair, LIMITS)[0])

    base = {j.name: tuple(sum(1 for n in current.get(j.name, ()) if n == node) for node in range(2)) for j in jobs}
    best = 0.0
    for cells in itertools.product(range(3), repeat=6):
        state = np.array(cells).reshape(3, 2)
        multi = np.count_nonzero(state, axis=1) > 1
        if np.any(state.sum(axis=0) > 2) or np.any(((state > 0) & multi[:, None]).sum(axis=0) > 1):
            continue
        vals = []
        for j, row in zip(jobs, state, strict=True):
            s = speedup(j, int(np.count_nonzero(row)), int(row.sum())) * 2 / 4
            if tuple(row) != base[j.name]:
                s *= max(j.age - j.num_restarts * 30, 0) / (j.age + 30)
            vals.append(s + 1e-3)
        best = max(best, len(vals) / sum(1 / v for v in vals))
    assert decision.info["fitness"] == pytest.approx(best, rel=1e-9)


def test_pollux_unmeasured_jobs_scale_perfectly_and_new_jobs_get_gpus() -> None:
    cluster = ClusterView(num_nodes=2, gpus_per_node=4)
    jobs = [_view("a", max_replicas=1), _view("b", max_replicas=1)]
    decision = PolluxPolicy(seed=1).decide(jobs, cluster, {}, now=60.0)
    assert sorted(len(v) for v in decision.allocations.values()) == [1, 1]


class _Oracle:
    def __init__(self, fn, remaining: float) -> None:  # type: ignore[no-untyped-def]
        self.fn, self.rem = fn, remaining

    def remaining_steps(self) -> float:
        return self.rem

    def step_time(self, num_replicas: int) -> float:
        return float(self.fn(num_replicas))


def test_optimus_greedy_marginal_gain_by_hand() -> None:
    cluster = ClusterView(num_nodes=2, gpus_per_node=4)
    jobs = [_view("A", oracle=_Oracle(lambda k: 12 / k, 100)),
            _view("B", oracle=_Oracle(lambda k: 12 / k**0.5, 100)),
            _view("C", oracle=_Oracle(lambda k: 5.0, 1000))]
    d = OptimusPolicy().decide(jobs, cluster, {}, now=60.0)
    # Gains: A 600, B 351.5, A 200, B 155.7, A 100 (> B 92.8) -> A 4, B 3, C 1; placed fewest first.
    assert d.allocations == {"C": (0,), "B": (1, 1, 1), "A": (0, 0, 0, 1)}


def test_optimus_keeps_unchanged_allocations() -> None:
    cluster = ClusterView(num_nodes=2, gpus_per_node=4)
    jobs = [_view("A", max_replicas=1, oracle=_Oracle(lambda k: 1.0, 10))]
    assert OptimusPolicy().decide(jobs, cluster, {"A": (1,)}, now=60.0).allocations == {"A": (1,)}


def test_tiresias_demotes_after_16_gpu_hours() -> None:
    cluster = ClusterView(num_nodes=1, gpus_per_node=4)
    policy = TiresiasPolicy()
    x = _view("X", requested_replicas=4, max_replicas=4)
    y = _view("Y", requested_replicas=2, max_replicas=2, submission_time=100.0)
    d = policy.decide([x], cluster, {}, now=60.0)
    assert d.allocations == {"X": (0, 0, 0, 0)}
    d = policy.decide([x, y], cluster, d.allocations, now=120.0)
    assert d.allocations == {"X": (0, 0, 0, 0)}  # Y waits in the same queue, behind X
    d = policy.decide([x, y], cluster, d.allocations, now=60.0 + 4 * 3600 - 1)
    assert "X" in d.allocations  # 4 GPUs x (4 h - 1 s): just under 16 GPU-hours
    d = policy.decide([x, y], cluster, d.allocations, now=60.0 + 4 * 3600)
    assert d.allocations == {"Y": (0, 0)}  # X demoted and preempted, Y runs
    assert policy.queues == [["Y"], ["X"]]


def test_fifo_blocks_at_the_head_unless_backfilling() -> None:
    cluster = ClusterView(num_nodes=1, gpus_per_node=4)
    jobs = [_view("A", requested_replicas=3), _view("B", requested_replicas=2, submission_time=1.0),
            _view("C", requested_replicas=1, submission_time=2.0)]
    assert set(FifoPolicy().decide(jobs, cluster, {}, now=60.0).allocations) == {"A"}
    assert set(FifoPolicy(backfill=True).decide(jobs, cluster, {}, now=60.0).allocations) == {"A", "C"}


def test_decision_validation_and_registry_errors() -> None:
    cluster = ClusterView(num_nodes=1, gpus_per_node=2)
    with pytest.raises(SchedulerError, match="more than 2 GPUs"):
        Decision(allocations={"a": (0, 0, 0)}, policy="p").validate(cluster)
    with pytest.raises(SchedulerError, match="nodes 0..0"):
        Decision(allocations={"a": (1,)}, policy="p").validate(cluster)
    with pytest.raises(SchedulerError, match="not active"):
        Decision(allocations={"zz": (0,)}, policy="p").validate(cluster, [_view("a")])
    with pytest.raises(SchedulerError, match="unknown policy"):
        make_policy("gavel")
    with pytest.raises(SchedulerError, match="NODESxGPUS"):
        ClusterView.parse("16by4")
    assert ClusterView.parse("16x4").total_gpus == 64
