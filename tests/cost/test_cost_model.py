"""The CostModel with and without a profile: compute, concurrency scaling, collectives, optimizer."""

from __future__ import annotations

from dataclasses import replace

import pytest
from costkit import GB, alpha_beta_table, cpu_profile, tiny_graph

from plait.cluster import load_cluster, local_cluster
from plait.cluster.spec import LinkSpec
from plait.cost import CostModel
from plait.cost.calibration import Calibration
from plait.cost.comm import flat_time, hierarchical_time, ring_time
from plait.cost.model import DEFAULT_KERNEL_OVERHEAD_S, DEFAULT_MATMUL_EFFICIENCY
from plait.cost.profile import SyncPoint
from plait.plan import BatchSpec, Instr, MeshSpec, Plan, RankProgram, shard
from plait.sim import instruction_time, simulate


def test_datasheet_cpu_time_adds_device_and_host_work() -> None:
    cluster = local_cluster(2)
    cost = CostModel(cluster)
    assert cost.profile is None
    peak = cluster.device.flops_for("fp32") * DEFAULT_MATMUL_EFFICIENCY["cpu"]
    expected = 1e9 / peak + 1e6 / cluster.device.memory_bandwidth + 3 * DEFAULT_KERNEL_OVERHEAD_S["cpu"]
    assert cost.compute_time(1e9, 1e6, num_kernels=3) == pytest.approx(expected)


def test_datasheet_gpu_time_overlaps_launches_with_kernels() -> None:
    cluster = load_cluster("dgx-a100:1")
    cost = CostModel(cluster)
    device_s = 1e12 / (312e12 * 0.6)
    assert cost.compute_time(1e12, dtype="bf16", num_kernels=10) == pytest.approx(device_s)  # compute bound
    assert cost.compute_time(1e6, dtype="bf16", num_kernels=10) == pytest.approx(10 * 10e-6)  # launch bound


def test_profile_curve_sets_the_gemm_rate() -> None:
    cost = CostModel(local_cluster(1), cpu_profile())
    for n, rate in ((64, 50e9), (256, 100e9)):
        flops = 2.0 * n**3
        assert cost.matmul_time(flops) == pytest.approx(flops / rate)
    mid = 2.0 * 128**3  # half way in log size: the time is the geometric mean of the neighbours' laws
    t64, t256 = 2.0 * 64**3 / 50e9, 2.0 * 256**3 / 100e9
    assert cost.matmul_time(mid) == pytest.approx((t64 * t256) ** 0.5)
    # A block of kernels reads the rate at its FLOPs per kernel: 4 kernels of a 64^3 GEMM each; on a CPU rank
    # its traffic moves at the elementwise rate (10 GB/s here), not the copy rate (20 GB/s).
    flops = 4 * 2.0 * 64**3
    assert cost.compute_time(flops, 2e6, num_kernels=4) == pytest.approx(flops / 50e9 + 2e6 / (10 * GB) + 4 * 5e-6)


def test_concurrency_reads_the_measured_level_and_scales_beyond_it() -> None:
    profile = cpu_profile(cores=2)
    flops = 2.0 * 256**3
    one = CostModel(local_cluster(1), profile)
    two = CostModel(local_cluster(2), profile)
    four = CostModel(local_cluster(4), profile)  # 4 ranks on 2 cores: level 2's times, doubled
    assert (one.concurrency, two.concurrency, four.concurrency) == (1, 2, 4)
    assert two.matmul_time(flops) == pytest.approx(2 * one.matmul_time(flops))
    assert four.matmul_time(flops) == pytest.approx(2 * two.matmul_time(flops))
    assert (one.kernel_overhead_s, two.kernel_overhead_s, four.kernel_overhead_s) == pytest.approx((5e-6, 8e-6, 16e-6))
    assert four.copy_bandwidth == pytest.approx(5 * GB)


def test_at_concurrency_reads_the_profile_for_that_many_computing_ranks() -> None:
    profile = cpu_profile(cores=2)
    four = CostModel(local_cluster(4), profile)
    flops = 2.0 * 256**3
    assert four.at_concurrency(4) is four
    assert four.at_concurrency(2) is four.at_concurrency(2)  # one model per level
    assert four.at_concurrency(2).matmul_time(flops) == pytest.approx(CostModel(local_cluster(2), profile).matmul_time(flops))
    assert four.at_concurrency(1).kernel_overhead_s == pytest.approx(5e-6)
    # the level changes nothing on a GPU or without a profile
    gpu = CostModel(load_cluster("dgx-a100:1"))
    datasheet = CostModel(replace(local_cluster(4), profile=None))
    assert gpu.at_concurrency(1) is gpu and datasheet.at_concurrency(1) is datasheet


def test_data_parallel_ranks_are_simulated_at_the_cost_models_level() -> None:
    # every rank of an SPMD program computes at once: the simulator reads the cost model's own level
    cost = CostModel(local_cluster(4), cpu_profile(cores=2))
    instrs = (
        Instr(op="compute", stream="compute", name="fwd", flops=2.0 * 256**3, bytes_moved=1e6, num_kernels=4),
        Instr(op="collective", stream="comm", name="ar", collective="all_reduce", nbytes=4096, group=(0, 1, 2, 3), deps=(0,)),
        Instr(op="optimizer", stream="compute", name="step", numel=1000, num_kernels=2, deps=(1,)),
    )
    plan = Plan(model=tiny_graph(), cluster=local_cluster(4), mesh=MeshSpec(shape=(4,), axes=("dp",)),
                batch=BatchSpec(global_size=16, micro_size=4, placements=(shard(0),)), params=(),
                programs=(RankProgram(ranks=(0, 1, 2, 3), instrs=instrs),))
    assert simulate(plan, cost).prediction.step_s == pytest.approx(sum(instruction_time(i, cost) for i in instrs))


def test_unmeasured_dtype_scales_fp32_by_the_datasheet() -> None:
    cluster = local_cluster(1)
    cost = CostModel(cluster, cpu_profile())
    ratio = cluster.device.flops_for("fp32") / cluster.device.flops_for("bf16")
    assert cost.matmul_time(1e9, dtype="bf16") == pytest.approx(ratio * cost.matmul_time(1e9, dtype="fp32"))


def test_collectives_follow_the_measured_table() -> None:
    alpha, beta = 200e-6, 1e-9
    sizes = (4096, 65536, 1048576)
    table = alpha_beta_table("all_reduce", 2, alpha, beta, sizes) + alpha_beta_table("p2p", 2, 50e-6, 0.5e-9, sizes)
    cost = CostModel(local_cluster(2), cpu_profile(collectives=table))
    for s in sizes:
        assert cost.collective_time("all_reduce", s, [0, 1]) == pytest.approx(alpha + beta * s)
    assert cost.collective_time("all_reduce", 300_000, [0, 1]) == pytest.approx(alpha + beta * 300_000, rel=0.05)
    assert cost.collective_time("all_reduce", 64 * 2**20, [0, 1]) == pytest.approx(alpha + beta * 64 * 2**20, rel=1e-6)
    assert cost.p2p_time(65536, 0, 1) == pytest.approx(50e-6 + 0.5e-9 * 65536)


def test_measured_sync_cost_is_added_to_each_collective_among_computing_ranks() -> None:
    table = alpha_beta_table("all_reduce", 2, 200e-6, 1e-9, (4096, 65536)) + alpha_beta_table("all_reduce", 3, 300e-6, 1e-9, (4096, 65536))
    profile = replace(cpu_profile(collectives=table), sync=(SyncPoint(group_size=2, seconds=1e-3), SyncPoint(group_size=3, seconds=2e-3)))
    assert CostModel(local_cluster(2), profile).collective_time("all_reduce", 4096, [0, 1]) == pytest.approx(200e-6 + 4096e-9 + 1e-3)
    assert CostModel(local_cluster(3), profile).collective_time("all_reduce", 4096, [0, 1, 2]) == pytest.approx(300e-6 + 4096e-9 + 2e-3)
    assert Calibration(profile).sync_time(4) == 2e-3  # nearest measured group size
    assert Calibration(cpu_profile()).sync_time(2) == 0.0  # none measured


def test_hierarchical_collective_reduces_inside_nodes_with_the_measured_table() -> None:
    table = alpha_beta_table("reduce_scatter", 2, 40e-6, 1e-9, (4096, 65536, 1048576))
    profile = replace(cpu_profile(collectives=table), sync=(SyncPoint(group_size=2, seconds=1e-3),))
    slow = LinkSpec(latency_s=60e-6, bandwidth=0.1e9)
    cluster = replace(local_cluster(2), num_nodes=2, inter_node=slow)
    nbytes = 2**20
    inner = 40e-6 + 1e-9 * nbytes + 1e-3  # measured on the 2 ranks of a node, plus their sync cost
    expected = hierarchical_time("all_reduce", nbytes, num_nodes=2, per_node=2, reduce_scatter_s=inner, inter=(60e-6, 0.1e9))
    assert expected < flat_time("all_reduce", nbytes, 4, 60e-6, 0.1e9)
    assert CostModel(cluster, profile).collective_time("all_reduce", nbytes, [0, 1, 2, 3]) == pytest.approx(expected)


def test_unmeasured_group_size_uses_the_link_fitted_on_the_largest_group() -> None:
    alpha, beta = 200e-6, 1e-9
    table = alpha_beta_table("all_reduce", 2, alpha, beta, (4096, 65536, 1048576))
    cost = CostModel(local_cluster(4), cpu_profile(collectives=table))
    latency, bandwidth = alpha / 2, 1 / beta  # ring on 2 ranks: 2 steps, all bytes once
    nbytes = 2**20
    expected = min(ring_time("all_reduce", nbytes, 4, latency, bandwidth), 2 * 2 * latency + 2 * nbytes / bandwidth)
    assert cost.collective_time("all_reduce", nbytes, [0, 1, 2, 3]) == pytest.approx(expected)


def test_optimizer_time_from_measured_rates_or_bandwidth() -> None:
    calibrated = CostModel(local_cluster(1), cpu_profile())
    assert calibrated.optimizer_time(1e6, num_tensors=10) == pytest.approx(1e6 * 2e-9 + 10 * 10e-6)
    datasheet = CostModel(local_cluster(1))
    assert datasheet.optimizer_time(1e6) == pytest.approx(32e6 / datasheet.copy_bandwidth + DEFAULT_KERNEL_OVERHEAD_S["cpu"])


def test_profile_may_be_an_object_a_path_or_a_packaged_name() -> None:
    profile = cpu_profile()
    assert CostModel(local_cluster(2), profile).profile is profile
    assert CostModel(load_cluster("h200:1"), "h200").profile is not None
    assert "datasheet" in CostModel(load_cluster("dgx-a100:1")).source
