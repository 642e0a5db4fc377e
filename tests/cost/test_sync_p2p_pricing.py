"""The sync runtime's own messages priced per message on the link each crosses: a parameter server's pushes and
answers one at a time (a node-mate's on the intra-node link), a node's link as the PS bottleneck, and the runtime's
flat ring across nodes as its slowest hop times its steps (docs/sync.md)."""

from __future__ import annotations

import pytest
from costkit import alpha_beta_table, cpu_profile

from plait.cluster import Cluster, cluster_from_dict, local_cluster
from plait.cost import CostModel
from plait.cost.sync_cost import allreduce_steps, chain_time, ps_exchange, ps_steps, server_loads, step_time

US, GB = 1e-6, 1e9
INTRA_LAT, INTRA_BW = 10 * US, 100 * GB
INTER_LAT, INTER_BW = 20 * US, 10 * GB  # per rank with both ranks of a node crossing: the node's link moves 20 GB/s
NODE_BW = 2 * INTER_BW


def two_by_two() -> Cluster:
    """2 nodes x 2 ranks without a profile (round numbers)."""
    return cluster_from_dict({
        "name": "sync-2x2", "num_nodes": 2, "devices_per_node": 2,
        "device": {"name": "d", "kind": "cuda", "peak_tflops": {"fp32": 100}, "memory_gb": 80,
                   "memory_bandwidth_gb_s": 2000},
        "links": {"intra_node": {"latency_us": 10, "bandwidth_gb_s": 100},
                  "inter_node": {"latency_us": 20, "bandwidth_gb_s": 10}},
    }, where="test")


def test_a_node_mates_push_is_priced_on_the_intra_node_link() -> None:
    cost = CostModel(two_by_two())
    loads = server_loads([((1000, 1000), 1, 0, (0,))], 4)  # 4 MB, all served by rank 0
    push = ps_exchange("push", loads)
    assert push.collective == "p2p_serial" and push.nbytes == 4_000_000 and push.order == (0, 1, 2, 3)
    node_mate = INTRA_LAT + 4e6 / INTRA_BW  # rank 1 -> 0
    other_node = INTER_LAT + 4e6 / NODE_BW  # ranks 2 and 3 -> 0, one after the other, each alone on the node link
    assert step_time(push, cost, range(4)) == pytest.approx(node_mate + 2 * other_node, rel=1e-12)
    assert cost.message_time(4e6, 1, 0) == pytest.approx(node_mate, rel=1e-12)


def test_the_busiest_server_leads_its_exchange() -> None:
    cost = CostModel(two_by_two())
    loads = server_loads([((100, 10), 1, 0, (0,)), ((1000, 1000), 1, 0, (3,))], 4)
    push = ps_exchange("push", loads, cost, range(4))
    assert push.order == (3, 0, 1, 2) and push.nbytes == 4_000_000
    assert step_time(push, cost, range(4)) == pytest.approx(2 * (INTER_LAT + 4e6 / NODE_BW) + INTRA_LAT + 4e6 / INTRA_BW)


def test_a_nodes_link_bounds_the_exchange_when_every_rank_serves_alike() -> None:
    cost = CostModel(two_by_two())
    loads = server_loads([((1000, 1000), 4, 0, ())], 4)  # 1 MB per rank
    serial = ps_exchange("push", loads)
    linked = ps_exchange("push", loads, cost, range(4))
    # both ranks of the other node send node 0's 2 MB (1 MB to each of its ranks) over the one link
    assert linked.order == (0, 2, 3) and linked.nbytes == 2_000_000
    link_s = 2 * (INTER_LAT + 2e6 / NODE_BW)
    assert step_time(linked, cost, range(4)) == pytest.approx(link_s, rel=1e-12)
    assert step_time(serial, cost, range(4)) < link_s  # the server alone would finish sooner
    steps = {s.name: s for s in ps_steps(loads, cost=cost, group=range(4))}
    assert steps["ps push"].order == steps["ps pull"].order == linked.order


def test_a_flat_ring_across_nodes_is_its_slowest_hop_times_its_steps() -> None:
    cost = CostModel(two_by_two())
    nbytes = 8_000_000
    chunk = nbytes / 4
    # hops 0->1, 2->3 inside nodes; 1->2 and 3->0 cross, one per direction: each alone on its node's link
    assert cost.collective_time("p2p_ring", nbytes, [0, 1, 2, 3]) == pytest.approx(3 * (INTER_LAT + chunk / NODE_BW))
    # ring 0->2->1->3->0: every hop crosses, two per direction share the link
    assert cost.collective_time("p2p_ring", nbytes, [0, 2, 1, 3]) == pytest.approx(3 * (INTER_LAT + 2 * chunk / NODE_BW))
    # one node: the slowest hop is an intra-node one
    assert cost.collective_time("p2p_ring", nbytes, [0, 1]) == pytest.approx(INTRA_LAT + nbytes / 2 / INTRA_BW)


def test_the_runtime_ring_is_not_priced_as_the_hierarchical_collective() -> None:
    cost = CostModel(two_by_two())
    ring = allreduce_steps("b", [(1000, 1000)], ring=True, num_workers=4)
    plain = allreduce_steps("b", [(1000, 1000)], num_workers=4)
    assert [s.collective for s in ring if s.kind == "collective"] == ["p2p_ring", "p2p_ring"]
    assert [s.collective for s in plain if s.kind == "collective"] == ["all_reduce"]
    comm = sum(step_time(s, cost, range(4)) for s in ring if s.kind == "collective")
    assert comm == pytest.approx(6 * (INTER_LAT + 1e6 / NODE_BW), rel=1e-12)
    assert chain_time(plain, cost, range(4)) < chain_time(ring, cost, range(4))


def test_a_ring_inside_one_node_takes_the_profiles_measured_ring_step() -> None:
    """Every rank of the ring sends at once; on a CPU node the messages share the cores, which the profile's
    ring_step table (all ranks moving a message together) measures and a lone pair's p2p does not."""
    pair = alpha_beta_table("p2p", 2, 50 * US, 1 / (2 * GB), (1024, 1 << 20, 1 << 24))
    ring = alpha_beta_table("ring_step", 4, 200 * US, 1 / (0.5 * GB), (1024, 1 << 20, 1 << 24))
    cost = CostModel(local_cluster(4), cpu_profile(collectives=pair + ring))
    nbytes = 8 << 20
    chunk = nbytes / 4
    assert cost.collective_time("p2p_ring", nbytes, [0, 1, 2, 3]) == pytest.approx(3 * (200 * US + chunk / (0.5 * GB)))
    # three ranks were not measured together: each hop is priced as the lone pair's message
    assert cost.collective_time("p2p_ring", nbytes, [0, 1, 2]) == pytest.approx(
        2 * (50 * US + (nbytes / 3) / (2 * GB)), rel=1e-3)
