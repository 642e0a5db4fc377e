"""Costs of the intra-op ILP from the one CostModel: resharding a tensor, an op's share of compute, a parameter's
optimizer step and data-parallel synchronisation, and the memory each choice holds."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from torch.distributed.device_mesh import DeviceMesh

from plait.graph.model_graph import DTYPE_BYTES
from plait.graph.model_graph import TensorMeta as PlaitMeta
from plait.plan.placement import Placement
from plait.planners.intra_op.dtensor_bridge import Placements, Transform, spec_of, transforms

INF = float("inf")


@dataclass(frozen=True)
class DataParallel:
    """The data-parallel axes around the model axes: how a parameter's gradient meets its replicas there."""

    groups: tuple[tuple[int, ...], ...] = ()  # rank 0's group over each data-parallel axis (replicate, shard)
    sharded: bool = False  # FSDP2 on the last data-parallel axis (else all-reduce over all of them)

    @property
    def degree(self) -> int:
        """Ranks the batch is split over."""
        n = 1
        for g in self.groups:
            n *= len(g)
        return n


def local_bytes(meta: PlaitMeta, placements: Placements, mesh_shape: Sequence[int]) -> int:
    """Bytes of one rank's shard (uneven splits round up)."""
    shape = list(meta.shape)
    for size, p in zip(mesh_shape, placements, strict=True):
        if p.is_shard:
            assert p.dim is not None
            shape[p.dim] = -(-shape[p.dim] // size)
    n = DTYPE_BYTES.get(meta.dtype, 4)
    for s in shape:
        n *= s
    return n


class CostTable:
    """Times from ``cost`` (a CostModel or one with the same interface) for tensors on ``mesh``, whose axis k
    is, among the plan's ranks, rank 0's group ``axis_groups[k]``."""

    def __init__(self, cost: Any, mesh: DeviceMesh, axis_groups: Sequence[tuple[int, ...]], *,
                 forbidden: Collection[str] = (), compute_dtype: str = "fp32") -> None:
        self.cost, self.mesh, self.axis_groups = cost, mesh, tuple(axis_groups)
        self.forbidden = frozenset(forbidden)
        self.compute_dtype = compute_dtype
        self.reshard = lru_cache(maxsize=None)(self._reshard)

    def collective(self, t: Transform) -> float:
        """Seconds of one collective of a redistribution (inf when its kind is forbidden)."""
        if t.collective in self.forbidden:
            return INF
        return float(self.cost.collective_time(t.collective, t.nbytes, self.axis_groups[t.mesh_dim]))

    def _reshard(self, meta: PlaitMeta, src: Placements, dst: Placements) -> float:
        if src == dst:
            return 0.0
        return sum(self.collective(t) for t in transforms(spec_of(self.mesh, meta, src), spec_of(self.mesh, meta, dst)))

    def compute(self, flops: float, divisor: int) -> float:
        """Seconds of an op's share of ``flops`` when ``divisor`` ranks split it."""
        if flops <= 0:
            return 0.0
        return float(self.cost.compute_time(flops / divisor, 0.0, dtype=self.compute_dtype, num_kernels=1))

    def param(self, meta: PlaitMeta, placements: Placements, dp: DataParallel, reduce_ratio: float) -> float:
        """A parameter's optimizer step on its shard plus its gradient's synchronisation over the data-parallel axes."""
        shard = local_bytes(meta, placements, self.mesh.shape)
        width = DTYPE_BYTES.get(meta.dtype, 4)
        numel = shard // width
        t = 0.0
        if dp.groups:
            grad = shard * reduce_ratio
            if dp.sharded:
                inner = dp.groups[-1]
                t += 2 * self.cost.collective_time("all_gather", shard, inner) + self.cost.collective_time("reduce_scatter", grad, inner)
                numel = -(-numel // len(inner))
                for g in dp.groups[:-1]:
                    t += self.cost.collective_time("all_reduce", grad / len(inner), g)
            else:
                group = tuple(r for g in dp.groups for r in g) if len(dp.groups) == 1 else _product_group(dp.groups)
                t += self.cost.collective_time("all_reduce", grad, group)
        return t + float(self.cost.optimizer_time(numel, num_tensors=1))


def _product_group(groups: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """The ranks of rank 0's group over several data-parallel axes (their sums of offsets)."""
    ranks = [0]
    for g in groups:
        ranks = sorted({r + x for r in ranks for x in g})
    return tuple(ranks)


def divisor_of(placements: Placements, mesh_shape: Sequence[int]) -> int:
    """How many ranks share the work of an op whose output has ``placements``."""
    n = 1
    for size, p in zip(mesh_shape, placements, strict=True):
        if p.is_shard or p.is_partial:
            n *= size
    return n


def is_replicated(placements: Placements) -> bool:
    """True when a tensor is a full copy on every model-axis rank."""
    return all(p == Placement("replicate") for p in placements)
