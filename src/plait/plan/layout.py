"""What a plan's placements imply: local shard shapes and the data-parallel axis parameters are sharded over."""

from __future__ import annotations

from collections.abc import Sequence

from plait.errors import PlaitError
from plait.plan.ir import MeshSpec, Plan
from plait.plan.placement import Placement


def local_shape(shape: Sequence[int], placements: Sequence[Placement], mesh: MeshSpec) -> tuple[int, ...]:
    """The largest shard of a tensor of ``shape`` on one rank (uneven splits round up, as FSDP2 pads)."""
    out = list(shape)
    for size, p in zip(mesh.shape, placements, strict=True):
        if p.is_shard:
            assert p.dim is not None
            out[p.dim] = -(-out[p.dim] // size)
    return tuple(out)


def local_numel(shape: Sequence[int], placements: Sequence[Placement], mesh: MeshSpec) -> int:
    """Elements of the largest shard on one rank."""
    n = 1
    for s in local_shape(shape, placements, mesh):
        n *= s
    return n


def shard_axis_of(plan: Plan) -> str | None:
    """The data-parallel axis over which parameters are ``Shard(0)`` (FSDP2), or None when they are replicated there.

    FSDP2 shards whole modules, so every parameter that is sharded on a data-parallel axis must be
    sharded on the same one.
    """
    if plan.is_pipeline:
        return None  # a pipeline's stages replicate their parameters over their data-parallel ranks
    dp = set(plan.data_parallel_axes)
    found = {a for p in plan.params for a, pl in zip(plan.mesh.axes, p.placements, strict=True) if a in dp and pl.is_shard}
    if len(found) > 1:
        raise PlaitError(f"parameters are sharded over several data-parallel axes {sorted(found)}; shard over one")
    return found.pop() if found else None


def layout_name(plan: Plan) -> str:
    """A short name of a plan's layout for progress lines: ``replicate dp=4``, ``fsdp dp=2``, ``intra-op dp=1 x tp=2``,
    ``pipeline pp=2 x dp=2``."""
    mesh = " x ".join(f"{a}={n}" for a, n in zip(plan.mesh.axes, plan.mesh.shape, strict=True))
    if plan.is_pipeline:
        return f"pipeline {mesh}"
    if plan.model_axes:
        return f"intra-op {mesh}"
    return f"{'fsdp' if shard_axis_of(plan) is not None else 'replicate'} {mesh}"
