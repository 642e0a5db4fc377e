"""Alpha-beta times of collectives and point-to-point transfers."""

from __future__ import annotations

import math
from typing import Literal

CollectiveOp = Literal["all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all"]
COLLECTIVE_OPS: tuple[CollectiveOp, ...] = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")


def ring_time(op: CollectiveOp, nbytes: float, n: int, latency_s: float, bandwidth: float) -> float:
    """Ring algorithm on ``n`` ranks; ``nbytes`` is the full (unsharded) tensor size.

    all_reduce moves 2(n-1)/n of the bytes per rank in 2(n-1) steps; all_gather and
    reduce_scatter half of that; broadcast is pipelined along the ring.
    """
    if n <= 1:
        return 0.0
    frac = (n - 1) / n
    if op == "all_reduce":
        return 2 * (n - 1) * latency_s + 2 * frac * nbytes / bandwidth
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) * latency_s + frac * nbytes / bandwidth
    return (n - 1) * latency_s + nbytes / bandwidth  # broadcast


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


def p2p_time(nbytes: float, latency_s: float, bandwidth: float) -> float:
    """One message between two ranks."""
    return latency_s + nbytes / bandwidth
