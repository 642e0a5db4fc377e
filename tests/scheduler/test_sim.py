"""Trace profiles, workloads and the simulator (small slices; full runs live in bench/sched_fidelity.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from plait.scheduler.decisions import ClusterView, SchedulerError
from plait.scheduler.policies import FifoPolicy, OptimusPolicy, PolluxPolicy, TiresiasPolicy
from plait.scheduler.policies.base import JobMode
from plait.scheduler.policies.ga import GAConfig
from plait.scheduler.sim.job import JobSpec
from plait.scheduler.sim.metrics import isolated_jct
from plait.scheduler.sim.profiles import TraceError, data_root, load_application, packed_placement
from plait.scheduler.sim.simulator import SimConfig, Simulator, simulate_schedule
from plait.scheduler.sim.workload import load_workload, published_results


def _rows(app: str, name: str) -> list[dict[str, str]]:
    with (data_root() / "traces" / app / name).open() as f:
        return list(csv.DictReader(f))


def test_throughput_reads_placement_rows_and_interpolates() -> None:
    app = load_application("cifar10")
    rows = [r for r in _rows("cifar10", "placements.csv") if r["placement"] == "24"]
    r0, r1 = rows[0], rows[1]
    b0, b1 = int(r0["local_bsz"]), int(r1["local_bsz"])
    assert app.throughput((2, 4), b0) == (float(r0["step_time"]), float(r0["sync_time"]))
    assert app.throughput((4, 2), b0) == app.throughput((2, 4), b0)  # rotations are the same placement
    mid = (b0 + b1) // 2
    w = (mid - b0) / (b1 - b0)
    expected = (1 - w) * float(r0["step_time"]) + w * float(r1["step_time"])
    assert app.throughput((2, 4), mid)[0] == pytest.approx(expected, rel=1e-12)


def test_throughput_beyond_the_placement_table_interpolates_in_3d() -> None:
    app = load_application("imagenet")
    step, sync = app.throughput((4, 4, 4, 4, 4), 100)  # 5 nodes: between the 4- and 6-node measurements
    lo = app.throughput((4, 4, 4, 4), 100)[0]
    hi_rows = [r for r in _rows("imagenet", "scalability.csv")
               if r["num_nodes"] == "6" and r["num_replicas"] == "24"]
    assert hi_rows and 0 < sync < step
    assert min(lo, *(float(r["step_time"]) for r in hi_rows)) * 0.5 < step < 2 * lo
    with pytest.raises(TraceError, match="outside"):
        app.throughput((4,), 10_000)


def test_grad_stats_and_progress_follow_the_validation_files() -> None:
    app = load_application("cifar10")
    r128 = _rows("cifar10", "validation-128.csv")
    r256 = _rows("cifar10", "validation-256.csv")
    assert app.grad_stats(128, 3) == (float(r128[3]["grad_sqr"]), float(r128[3]["grad_var"]))
    sqr = app.grad_stats(192, 3)[0]
    assert sqr == pytest.approx((float(r128[3]["grad_sqr"]) + float(r256[3]["grad_sqr"])) / 2)
    all_progress = [float(_rows("cifar10", f"validation-{b}.csv")[4]["progress"])
                    for b in (128, 256, 512, 1024, 2048, 4096)]
    assert app.progress(5) == min(all_progress) and app.progress(0) == 0.0
    assert (app.init_batch_size, app.max_batch_size, app.max_epochs) == (128, 4096, 100)


def test_packed_placement_step_time_gain_and_batch_cap() -> None:
    assert packed_placement(10, 4) == (4, 4, 2) and packed_placement(8, 4) == (4, 4) and packed_placement(3, 8) == (3,)
    app = load_application("cifar10")
    step, sync = app.throughput((4, 2), 256)
    assert app.step_time((4, 2), 256, 3) == step + 3 * (step - sync)
    sqr, var = app.grad_stats(512, 7)
    assert app.gain(512, 7) == pytest.approx((var + sqr) / (var / 4 + sqr), rel=1e-15)
    assert app.cap_local_bsz(1000, 2, 1) == 1000 and app.cap_local_bsz(1000, 4, 1) == 512  # 4096 / (4 * 2)


@pytest.mark.parametrize("policy_cls,name", [(TiresiasPolicy, "tiresias"), (OptimusPolicy, "optimus")])
@pytest.mark.parametrize("workload", ["workload-3", "workload-6"])
def test_baselines_reproduce_published_jcts_exactly(policy_cls, name: str, workload: str) -> None:  # type: ignore[no-untyped-def]
    result = Simulator(load_workload(workload), policy_cls()).run()
    published = published_results(name)[workload]
    assert result.jcts().keys() == published.keys()
    assert max(abs(result.jcts()[k] - v) for k, v in published.items()) < 1e-6


def test_simulate_schedule_takes_names_or_objects() -> None:
    specs = [s for s in load_workload("workload-6")[:8] if s.num_replicas <= 8]
    by_name = simulate_schedule(specs, "tiresias", cluster="2x4", interval=120)
    direct = Simulator(specs, TiresiasPolicy(), SimConfig(cluster=ClusterView(num_nodes=2, gpus_per_node=4),
                                                          interval=120)).run()
    assert by_name.jcts() == direct.jcts() and (by_name.cluster, by_name.interval) == ("2x4", 120)


def test_a_lone_job_takes_its_isolated_time_plus_waiting_and_restart() -> None:
    spec = JobSpec(name="c", application="cifar10", submission_time=0, num_replicas=4, batch_size=512)
    result = Simulator([spec], FifoPolicy()).run()
    (job,) = result.jobs
    ideal = isolated_jct("cifar10", JobMode.RIGID, 4, 512, 64)
    # First decision at t=60, then a 30 s restart; each of 100 epochs rounds to whole seconds.
    assert job.jct == pytest.approx(60 + 30 + ideal, abs=50)
    assert job.num_restarts == 0 and result.makespan == job.completion_time
    assert 0 < result.gpu_utilization <= 4 / 64


def _slice(n: int) -> list[JobSpec]:
    return load_workload("workload-6")[:n]


def test_pollux_on_a_workload_slice_is_deterministic_and_adapts() -> None:
    ga = GAConfig(pop_size=30, generations=15)
    runs = [Simulator(_slice(10), PolluxPolicy(seed=3, ga=ga)) for _ in range(2)]
    results = [s.run() for s in runs]
    assert results[0].jcts() == results[1].jcts()
    sim = runs[0]
    assert all(j.completion_time is not None for j in sim.jobs)
    adaptive = [j for j in sim.jobs if j.spec.application != "ncf"]
    assert any(len({k[2] for k in j.profile}) > 1 for j in adaptive)  # micro-batch changed over time
    assert all(j.perf_params is not None for j in adaptive)
    assert results[0].gpu_utilization <= 1.0 and results[0].total_restarts >= 0


def test_pollux_beats_tiresias_on_a_busy_slice() -> None:
    specs = [JobSpec(name=s.name, application=s.application, submission_time=s.submission_time // 4,
                     num_replicas=s.num_replicas, batch_size=s.batch_size) for s in _slice(30)
             if s.application in ("cifar10", "ncf", "bert", "deepspeech2")]
    config = SimConfig(cluster=ClusterView(num_nodes=4, gpus_per_node=4))
    pollux = Simulator(specs, PolluxPolicy(seed=0, ga=GAConfig(pop_size=40, generations=20)), config).run()
    tiresias = Simulator(specs, TiresiasPolicy(), config).run()
    assert pollux.avg_jct < tiresias.avg_jct


def test_simulator_and_workload_errors(tmp_path: Path) -> None:
    big = JobSpec(name="x", application="bert", submission_time=0, num_replicas=16, batch_size=12)
    with pytest.raises(SchedulerError, match="more GPUs"):
        Simulator([big], TiresiasPolicy(), SimConfig(cluster=ClusterView(num_nodes=2, gpus_per_node=4)))
    tiny = JobSpec(name="y", application="cifar10", submission_time=0, num_replicas=1, batch_size=64)
    with pytest.raises(SchedulerError, match="outside the measured range 128..4096"):
        Simulator([tiny], OptimusPolicy())
    with pytest.raises(SchedulerError, match="interval"):
        SimConfig(interval=0)
    bad = tmp_path / "w.csv"
    bad.write_text("name,time,application\na,0,bert\n")
    with pytest.raises(SchedulerError, match="missing columns"):
        load_workload(bad)
    bad.write_text("name,time,application,num_replicas,batch_size\na,0,gpt9,1,8\n")
    with pytest.raises(SchedulerError, match="unknown application"):
        load_workload(bad)
    with pytest.raises(SchedulerError, match="neither a file"):
        load_workload(tmp_path / "nope.csv")
    assert len(load_workload("6")) == 160 and np.all(np.diff([s.submission_time for s in load_workload("6")]) >= 0)
