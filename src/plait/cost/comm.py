"""Alpha-beta times of collectives and point-to-point transfers."""

from __future__ import annotations

import math
from typing import Literal

CollectiveOp = Literal["all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all"]
COLLECTIVE_OPS: tuple[CollectiveOp, ...] = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")
# Patterns of point-to-point messages that ``plait.runtime.sync`` builds its exchanges from; priced per message, over
# the link each message crosses (``CostModel.p2p_pattern_time``), never as a backend collective.
P2PPattern = Literal["p2p_serial", "p2p_ring"]
P2P_PATTERNS: tuple[P2PPattern, ...] = ("p2p_serial", "p2p_ring")


def ring_coefficients(op: CollectiveOp, n: int) -> tuple[float, float]:
    """``(steps, fraction)`` of the ring algorithm: time = steps * latency + fraction * nbytes / bandwidth.

    all_reduce moves 2(n-1)/n of the bytes per rank in 2(n-1) steps; all_gather, reduce_scatter and
    all_to_all half of that; broadcast is pipelined along the ring (n-1 steps, all bytes).
    """
    if n <= 1:
        return 0.0, 0.0
    frac = (n - 1) / n
    if op == "all_reduce":
        return 2.0 * (n - 1), 2.0 * frac
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return float(n - 1), frac
    return float(n - 1), 1.0  # broadcast


def ring_time(op: CollectiveOp, nbytes: float, n: int, latency_s: float, bandwidth: float) -> float:
    """Ring algorithm on ``n`` ranks; ``nbytes`` is the full (unsharded) tensor size."""
    steps, frac = ring_coefficients(op, n)
    return steps * latency_s + frac * nbytes / bandwidth


def tree_time(op: CollectiveOp, nbytes: float, n: int, latency_s: float, bandwidth: float) -> float:
    """Binary-tree algorithm: log2(n) latency steps; reduce then broadcast for all_reduce."""
    if n <= 1:
        return 0.0
    depth = math.ceil(math.log2(n))
    if op == "all_reduce":
        return 2 * depth * latency_s + 2 * nbytes / bandwidth
    if op == "broadcast":
        return depth * latency_s + nbytes / bandwidth
    return ring_time(op, nbytes, n, latency_s, bandwidth)  # gathers have no tree advantage


def flat_time(op: CollectiveOp, nbytes: float, n: int, latency_s: float, bandwidth: float) -> float:
    """The faster of ring and tree on one level of links (what NCCL picks)."""
    return min(ring_time(op, nbytes, n, latency_s, bandwidth), tree_time(op, nbytes, n, latency_s, bandwidth))


def hierarchical_time(
    op: CollectiveOp,
    nbytes: float,
    *,
    num_nodes: int,
    per_node: int,
    reduce_scatter_s: float,
    inter: tuple[float, float],
) -> float:
    """A collective over ``num_nodes`` x ``per_node`` ranks in three phases.

    Intra-node reduce-scatter of the full tensor (``reduce_scatter_s``, measured or from a formula), the
    collective across nodes on each rank's 1/per_node slice (ring or tree on ``inter``, the inter-node
    ``(latency_s, bandwidth)``), and for all_reduce an intra-node all-gather that mirrors the first phase.
    """
    outer = flat_time(op, nbytes / per_node, num_nodes, *inter)
    return (2 * reduce_scatter_s if op == "all_reduce" else reduce_scatter_s) + outer


def link_from_fit(op: CollectiveOp, n: int, alpha: float, beta: float) -> tuple[float, float]:
    """The ``(latency_s, bandwidth)`` for which the ring formula gives ``alpha + beta * nbytes`` on ``n`` ranks."""
    steps, frac = ring_coefficients(op, n)
    if steps <= 0:
        raise ValueError(f"a {op} on {n} rank(s) moves nothing; cannot infer a link from it")
    bandwidth = frac / beta if beta > 0 else math.inf
    return alpha / steps, bandwidth


def p2p_time(nbytes: float, latency_s: float, bandwidth: float) -> float:
    """One message between two ranks."""
    return latency_s + nbytes / bandwidth
