"""Tensor parallelism from a plan's placements: DTensor parameters, pinned activations, gradient placements.

On the model axes of a plan, parameters are DTensors with the planned placements and activations flow as
DTensors; at the module boundaries the planner pinned, hooks redistribute them (and their gradients) to
the pinned placements (``tensor_parallel_pins``). The root module takes and returns plain tensors (a plain
tensor entering the model is the same on every model-axis rank, i.e. replicated), so the user's data and
loss code never see a DTensor, and forward and backward need no context around them.

Order: ``distribute_parameters``, then ``pin_activations``, then data parallelism on the other axes
(``WaitFreeReplicate`` or FSDP2's ``fully_shard`` on a sub-mesh of the same parent mesh); after backward,
``reduce_grads_to_placements`` (a no-op under WFBP and FSDP2, which reduce such gradients themselves).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from plait.dtensor_rules import ensure_rules
from plait.errors import PlaitError
from plait.plan.placement import Placement
from plait.runtime.tensor_parallel_pins import Pin, pin_activations, replicate_plain_tensors, to_placements

__all__ = [
    "Pin",
    "distribute_parameters",
    "pin_activations",
    "reduce_grads_to_placements",
    "replicate_plain_tensors",
    "to_placements",
]


# ---- parameters ------------------------------------------------------------------------------------


def distribute_parameters(
    model: nn.Module, mesh: DeviceMesh, placements: Mapping[str, Sequence[Placement]]
) -> None:
    """Make every parameter a DTensor on ``mesh`` with its placements (unlisted ones: replicated).

    Each parameter must hold the same full tensor on every rank (seeded build); the rank keeps its
    shard without communicating. ``Partial`` is refused, and so is a split that does not divide.
    """
    ensure_rules()
    named = dict(model.named_parameters())
    unknown = sorted(set(placements) - set(named))
    if unknown:
        raise PlaitError(
            f"placements name parameters the model does not have: {', '.join(unknown[:5])}; "
            "the plan was made for another model: re-run `plait plan`"
        )
    replaced: dict[int, nn.Parameter] = {}
    for name, param in named.items():
        wanted = tuple(placements.get(name, (Placement("replicate"),) * mesh.ndim))
        _check_placements(name, tuple(param.shape), wanted, mesh)
        if isinstance(param, DTensor):
            raise PlaitError(f"parameter {name!r} is already a DTensor; distribute a model's parameters once")
        dt = distribute_tensor(param.detach(), mesh, [p.to_dtensor() for p in wanted], src_data_rank=None)
        replaced[id(param)] = nn.Parameter(dt, requires_grad=param.requires_grad)
    for module in model.modules():  # also every alias of a tied parameter
        for local, old in list(module._parameters.items()):
            if old is not None and id(old) in replaced:
                setattr(module, local, replaced[id(old)])


def _check_placements(
    name: str, shape: tuple[int, ...], wanted: tuple[Placement, ...], mesh: DeviceMesh
) -> None:
    """Raise a PlaitError unless ``wanted`` is one Shard/Replicate per mesh axis, with splits that divide."""
    axes = mesh.mesh_dim_names or tuple(f"axis {i}" for i in range(mesh.ndim))
    if len(wanted) != mesh.ndim:
        raise PlaitError(
            f"parameter {name!r} has {len(wanted)} placements but the mesh has {mesh.ndim} axes {axes}"
        )
    ways: dict[int, int] = {}
    for axis, placement in zip(axes, wanted, strict=True):
        if placement.is_partial:
            raise PlaitError(
                f"parameter {name!r} is Partial on mesh axis {axis!r}; a parameter holds values, not "
                "pending sums: use Shard(dim) or Replicate() (Partial belongs to activations and gradients)"
            )
        if placement.is_shard:
            assert placement.dim is not None
            dim = placement.dim + len(shape) if placement.dim < 0 else placement.dim
            if not 0 <= dim < len(shape):
                raise PlaitError(
                    f"parameter {name!r} of shape {list(shape)} has no dim {placement.dim} "
                    f"to shard on axis {axis!r}"
                )
            ways[dim] = ways.get(dim, 1) * mesh.size(axes.index(axis))
    for dim, split in ways.items():
        if shape[dim] % split:
            raise PlaitError(
                f"parameter {name!r}: dim {dim} of size {shape[dim]} does not split evenly over a mesh of "
                f"size {split}; change the placement or the mesh"
            )


def reduce_grads_to_placements(model: nn.Module) -> int:
    """Redistribute every DTensor gradient whose placements differ from its parameter's; how many were.

    A replicated weight used on sharded activations (a LayerNorm under sequence parallelism) gets a
    ``Partial`` gradient: summing it over the axis (an all-reduce) makes it the parameter's placement
    again. Call it after backward, before the optimizer step. Collective over the model axes.
    """
    count = 0
    for param in model.parameters():
        grad = param.grad
        if isinstance(param, DTensor) and isinstance(grad, DTensor) and _differs(grad, param):
            param.grad = grad.redistribute(param.device_mesh, param.placements)
            count += 1
    return count


def _differs(grad: DTensor, param: DTensor) -> bool:
    return bool(grad.placements != param.placements or grad.device_mesh != param.device_mesh)
