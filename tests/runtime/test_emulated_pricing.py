"""Pricing plans on an emulated cluster (``plait.testing.SharedMachineCost``): the links of the two-level
cluster `plait profile --nnodes 2` measured, compute read at the number of ranks of the whole machine busy."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_netns_cluster import TINY_PROFILE, emulated_or_skip

from plait.cluster import Cluster, cluster_from_dict, load_cluster
from plait.cost import CostModel
from plait.testing import LinkShape, SharedMachineCost, profile_emulated
from tests.cost.costkit import cpu_profile


def two_nodes(per_node: int = 1) -> Cluster:
    return cluster_from_dict({
        "name": "measured:2x1", "num_nodes": 2, "devices_per_node": per_node,
        "device": {"name": "cpu-rank", "kind": "cpu", "peak_tflops": {"fp32": 0.1}, "memory_gb": 4,
                   "memory_bandwidth_gb_s": 10},
        "links": {"intra_node": {"latency_us": 100, "bandwidth_gb_s": 1.0},
                  "inter_node": {"latency_us": 1000, "bandwidth_gb_s": 0.0625}},
    }, where="test")


def test_compute_is_read_at_the_machines_busy_ranks_and_links_from_the_cluster() -> None:
    profile = cpu_profile()  # levels 1 and 2: the machine's two ranks
    cluster = two_nodes()  # 2 nodes x 1 rank, emulated on that machine
    shared = SharedMachineCost(cluster, profile)
    assert shared.concurrency == 2
    # one rank of each node computing at once is both ranks of the machine: the level-2 rates
    machine = CostModel(cluster, profile, concurrency=2)
    plain = CostModel(cluster, profile)  # per node: one rank, the level-1 rates
    flops = 2 * 256**3
    assert shared.at_concurrency(1).compute_time(flops) == pytest.approx(machine.compute_time(flops))
    assert shared.at_concurrency(1).compute_time(flops) == pytest.approx(2 * plain.compute_time(flops), rel=0.05)
    # levels beyond the profile's are capped at its largest
    assert shared.at_concurrency(4).compute_time(flops) == pytest.approx(machine.compute_time(flops))
    # the inter-node link is the cluster's: 1 MB at 62.5 MB/s plus 1 ms
    assert shared.p2p_time(1e6, 0, 1) == pytest.approx(1e-3 + 1e6 / 0.0625e9)


def test_profile_emulated_runs_plait_profile_on_every_node(tmp_path: Path) -> None:
    shape = LinkShape.gbit(1.0)
    with emulated_or_skip(2, shape=shape) as emu:
        path = profile_emulated(emu, tmp_path / "emu.json", nproc=2, port=29547,
                                argv0=[sys.executable, "-c", TINY_PROFILE])
    assert path == tmp_path / "emu.cluster.yaml"
    assert (tmp_path / "emu.json").is_file() and (tmp_path / "emu.node1.log").is_file()
    c = load_cluster(path)
    assert (c.num_nodes, c.devices_per_node) == (2, 2)
    # each of a node's 2 ranks crossing at once gets about half the tbf rate (the bounds of test_netns_cluster)
    assert 0.7 < c.inter_node.bandwidth / (shape.bytes_per_s / 2) < 1.2, c.inter_node
    assert c.intra_node.bandwidth > 3 * shape.bytes_per_s
