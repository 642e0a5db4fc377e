"""Alpha-beta collective formulas, their inverse, and the CostModel's flat and hierarchical choice."""

from __future__ import annotations

import math

import pytest

from plait.cluster import load_cluster
from plait.cost import CostModel
from plait.cost.comm import flat_time, hierarchical_time, link_from_fit, p2p_time, ring_time, tree_time

ALPHA, BW = 10e-6, 100e9  # 10 us per step, 100 GB/s
MB = 2**20


@pytest.mark.parametrize("n", [2, 3, 4, 8, 64])
def test_ring_formulas(n: int) -> None:
    nbytes = 64 * MB
    assert ring_time("all_reduce", nbytes, n, ALPHA, BW) == pytest.approx(2 * (n - 1) / n * nbytes / BW + 2 * (n - 1) * ALPHA)
    for op in ("all_gather", "reduce_scatter", "all_to_all"):
        assert ring_time(op, nbytes, n, ALPHA, BW) == pytest.approx((n - 1) / n * nbytes / BW + (n - 1) * ALPHA)
    assert ring_time("broadcast", nbytes, n, ALPHA, BW) == pytest.approx(nbytes / BW + (n - 1) * ALPHA)


def test_single_rank_moves_nothing() -> None:
    assert ring_time("all_reduce", MB, 1, ALPHA, BW) == 0.0
    assert tree_time("all_reduce", MB, 1, ALPHA, BW) == 0.0


def test_tree_wins_for_small_messages_on_many_ranks() -> None:
    n, small, big = 64, 1024, 8192 * MB  # ring latency grows with n: it needs a huge message to win
    assert tree_time("all_reduce", small, n, ALPHA, BW) == pytest.approx(2 * 6 * ALPHA + 2 * small / BW)
    assert flat_time("all_reduce", small, n, ALPHA, BW) == tree_time("all_reduce", small, n, ALPHA, BW)
    assert flat_time("all_reduce", big, n, ALPHA, BW) == ring_time("all_reduce", big, n, ALPHA, BW)
    assert tree_time("all_gather", big, n, ALPHA, BW) == ring_time("all_gather", big, n, ALPHA, BW)


def test_p2p() -> None:
    assert p2p_time(MB, ALPHA, BW) == pytest.approx(ALPHA + MB / BW)


@pytest.mark.parametrize("op", ["all_reduce", "all_gather", "reduce_scatter", "broadcast"])
def test_link_from_fit_inverts_the_ring_formula(op: str) -> None:
    n, alpha, beta = 4, 300e-6, 2e-9
    latency, bandwidth = link_from_fit(op, n, alpha, beta)
    for nbytes in (0, 4096, 64 * MB):
        assert ring_time(op, nbytes, n, latency, bandwidth) == pytest.approx(alpha + beta * nbytes)


def test_hierarchical_all_reduce_on_two_dgx_nodes_by_hand() -> None:
    cluster = load_cluster("dgx-a100:2")  # 8 GPUs per node; NVLink 8 us / 300 GB/s, IB 12 us / 25 GB/s
    cost = CostModel(cluster)
    nbytes = 256 * MB
    a1, b1 = 8e-6, 300e9
    a2, b2 = 12e-6, 25e9
    # Intra-node ring reduce-scatter on 8 ranks, inter-node all-reduce of a 1/8 slice on 2 nodes
    # (ring and tree agree for n = 2), then the intra-node all-gather mirroring the first phase.
    rs = 7 * a1 + 7 / 8 * nbytes / b1
    inter = 2 * 1 * a2 + 2 * (1 / 2) * (nbytes / 8) / b2
    hierarchical = 2 * rs + inter
    flat = min(2 * 15 * a2 + 2 * 15 / 16 * nbytes / b2, 2 * 4 * a2 + 2 * nbytes / b2)
    assert hierarchical < flat
    assert cost.collective_time("all_reduce", nbytes, list(range(16))) == pytest.approx(hierarchical)
    assert hierarchical_time("all_reduce", nbytes, num_nodes=2, per_node=8, reduce_scatter_s=rs, inter=(a2, b2)) == pytest.approx(
        hierarchical
    )


def test_group_inside_one_node_uses_the_intra_node_link() -> None:
    cost = CostModel(load_cluster("dgx-a100:2"))
    nbytes = 64 * MB
    expected = flat_time("all_gather", nbytes, 4, 8e-6, 300e9)
    assert cost.collective_time("all_gather", nbytes, [8, 9, 10, 11]) == pytest.approx(expected)
    assert cost.collective_time("all_gather", nbytes, [3]) == 0.0


def test_broadcast_across_nodes_runs_flat() -> None:
    cost = CostModel(load_cluster("dgx-a100:2"))
    nbytes = 8 * MB
    expected = flat_time("broadcast", nbytes, 16, 12e-6, 25e9)
    assert cost.collective_time("broadcast", nbytes, list(range(16))) == pytest.approx(expected)
    assert math.isclose(cost.p2p_time(nbytes, 0, 8), 12e-6 + nbytes / 25e9)
    assert math.isclose(cost.p2p_time(nbytes, 0, 1), 8e-6 + nbytes / 300e9)
