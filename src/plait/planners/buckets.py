"""Gradient buckets for replicated data parallelism: backward order, greedy packing under a byte cap."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from plait.graph.model_graph import ModelGraph, ParamInfo
from plait.plan.ir import Bucket

MiB = 1 << 20
DEFAULT_BUCKET_BYTES = 25 * MiB  # torch DDP's default bucket_cap_mb


def gradient_order(graph: ModelGraph) -> tuple[ParamInfo, ...]:
    """Parameters in the order backward produces their gradients.

    Layers run backward from last to first; inside a layer, autograd reaches the parameters used
    last first, which for the layer view is reverse registration order.
    """
    order: list[ParamInfo] = []
    for layer in reversed(graph.layers):
        order.extend(reversed(graph.params_of(layer.index)))
    return tuple(order)


def pack_greedy(sizes: Sequence[int], cap: int) -> list[list[int]]:
    """Split ``sizes`` (in order) into contiguous groups of at most ``cap`` bytes; returns index groups.

    A group is closed as soon as the next item would push it over the cap; an item larger than the
    cap gets a group of its own. This next-fit packing gives the fewest contiguous groups.
    """
    if cap <= 0:
        raise ValueError(f"bucket cap must be positive, got {cap}")
    groups: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for i, size in enumerate(sizes):
        if current and filled + size > cap:
            groups.append(current)
            current, filled = [], 0
        current.append(i)
        filled += size
        if filled >= cap:
            groups.append(current)
            current, filled = [], 0
    if current:
        groups.append(current)
    return groups


def make_buckets(graph: ModelGraph, bucket_bytes: int, local_bytes: Mapping[str, int] | None = None) -> tuple[Bucket, ...]:
    """The gradient buckets of ``graph`` for a cap of ``bucket_bytes``, in the order they become ready.

    ``local_bytes`` gives a parameter's shard on a rank when model axes shard it (default: its full size).
    """
    order = gradient_order(graph)
    size = {p.name: p.nbytes for p in order} if local_bytes is None else dict(local_bytes)
    buckets = []
    for index, group in enumerate(pack_greedy([size[p.name] for p in order], bucket_bytes)):
        members = [order[i] for i in group]
        buckets.append(
            Bucket(
                index=index,
                params=tuple(p.name for p in members),
                nbytes=sum(size[p.name] for p in members),
                ready_after_layer=min(p.layer for p in members),
            )
        )
    return tuple(buckets)
