"""Tensor parallelism inside pipeline stages, and the resharding of the tensors that cross a stage boundary.

A stage's ranks form its ``tp`` submesh (one per pipeline replica); its layers get DTensor parameters with the
placements the caller gives (``distribute_parameters``) and its pinned activations their hooks
(``pin_activations``), as in an intra-op run. What crosses a boundary is each tp rank's *local piece* of the
stage output under the placement the boundary declares (``Boundary.sent``: ``Shard(1)`` sends a sequence slice,
``Replicate()`` the whole tensor). The pipeline's process groups pair rank (stage s, dp j, tp k) with
(stage s + 1, dp j, tp k), so only that piece crosses; the receiver wraps it as a DTensor with the sender's
placement on its own tp submesh and redistributes it to what its first layer needs (``Boundary.needed``): an
all-gather inside the receiving submesh for ``Shard -> Replicate``. Backward runs the same path in reverse (the
gradient of the local piece goes back). Adjacent stages must have the same tp size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Placement as DTensorPlacement

from plait.errors import PlaitError
from plait.plan.placement import REPLICATE, Placement
from plait.runtime.tensor_parallel import Pin, distribute_parameters, pin_activations

if TYPE_CHECKING:
    from plait.runtime.pipeline import ChainStage

__all__ = ["Boundary", "StageSharding", "TensorParallelStage", "check_stage_sharding", "tensor_parallel_stage"]

Placements = tuple[Placement, ...]
REPLICATED: Placements = (REPLICATE,)


@dataclass(frozen=True)
class Boundary:
    """The tensor between virtual stages s and s + 1, on the tp axis: what is sent and what the receiver needs."""

    sent: Placements = REPLICATED  # each tp rank sends its local piece under this placement
    needed: Placements = REPLICATED  # the receiver redistributes the pieces to this before its first layer


@dataclass(frozen=True, kw_only=True)
class StageSharding:
    """How stages use their tp axis: parameter placements and pins (model names), and the boundaries.

    ``placements`` maps a model parameter name to its placements on the tp axis (unlisted: replicated);
    ``pins`` are the model's pinned activations; ``boundaries[s]`` is the boundary after virtual stage ``s``
    (empty: every boundary replicated). The last stage's output is always replicated (the loss needs it whole).
    """

    placements: Mapping[str, Sequence[Placement]] = field(default_factory=dict)
    pins: Sequence[Pin] = ()
    boundaries: Sequence[Boundary] = ()

    def boundary(self, s: int) -> Boundary:
        """The boundary after virtual stage ``s`` (replicated when none is given)."""
        return self.boundaries[s] if self.boundaries else Boundary()


class TensorParallelStage(nn.Module):
    """A stage's chain of layers on its tp submesh: it takes and returns the local pieces of its boundary tensors."""

    def __init__(self, chain: ChainStage, mesh: DeviceMesh, *, received: Placements, needed: Placements,
                 sent: Placements) -> None:
        super().__init__()
        self.chain = chain
        self.mesh = mesh
        self.received, self.needed, self.sent = received, needed, sent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The received piece as a DTensor with the sender's placement, redistributed to what the first layer needs;
        the layers; the output redistributed to the sent placement, as this rank's local piece."""
        local = x.to_local() if isinstance(x, DTensor) else x  # the root hook labelled the plain piece replicated
        dt = DTensor.from_local(local, self.mesh, _dtensor(self.received), run_check=False)
        if self.needed != self.received:
            dt = dt.redistribute(self.mesh, _dtensor(self.needed))
        y = self.chain(dt)
        if not isinstance(y, DTensor):
            y = DTensor.from_local(y, self.mesh, _dtensor(REPLICATED), run_check=False)
        _check_divides(tuple(y.shape), self.sent, self.mesh.size())
        if tuple(y.placements) != _dtensor(self.sent):
            y = y.redistribute(self.mesh, _dtensor(self.sent))
        return y.to_local()


def tensor_parallel_stage(chain: ChainStage, mesh: DeviceMesh, sharding: StageSharding, index: int,
                          virtual: int) -> TensorParallelStage:
    """Virtual stage ``index`` (of ``virtual``) on ``mesh``: its parameters distributed, its pins hooked."""
    before = sharding.boundary(index - 1) if index > 0 else Boundary()
    sent = sharding.boundary(index).sent if index < virtual - 1 else REPLICATED
    stage = TensorParallelStage(chain, mesh, received=before.sent, needed=before.needed, sent=sent)
    names = chain.names
    placements = {}
    for name, value in sharding.placements.items():
        local = stage_name(name, names)
        if local is not None:
            placements[local] = tuple(value)
    distribute_parameters(stage, mesh, placements)
    pins = [Pin(local, pin.port, pin.position, tuple(pin.placements)) for pin in sharding.pins
            if (local := stage_name(pin.module, names)) is not None]
    pin_activations(stage, mesh, pins)
    return stage


def stage_name(name: str, layers: Sequence[str]) -> str | None:
    """A model name (of a parameter or module) as the stage module of ``layers`` names it; None if not in them."""
    for i, layer in enumerate(layers):
        if name == layer or name.startswith(layer + "."):
            return f"chain.layers.{i}{name[len(layer):]}"
    return None


def check_stage_sharding(sharding: StageSharding, stage_layers: Sequence[Sequence[str]], tp: int | Sequence[int],
                         model: nn.Module) -> int:
    """Raise ``PlaitError`` naming what does not fit; the one tp size of every stage."""
    sizes = [tp] if isinstance(tp, int) else list(tp)
    if len(set(sizes)) != 1 or sizes[0] < 1:
        raise PlaitError(f"stages of tensor-parallel sizes {sizes}: plait's pipeline runs stages of one tp size "
                         "(>= 1) for now; resharding between submeshes of different sizes is not supported yet")
    virtual = len(stage_layers)
    if sharding.boundaries and len(sharding.boundaries) != virtual - 1:
        raise PlaitError(f"{len(sharding.boundaries)} boundaries for {virtual} stages: give one per boundary "
                         f"({virtual - 1}), or none for replicated boundaries")
    for s, b in enumerate(sharding.boundaries):
        for what, given in (("sent", b.sent), ("needed", b.needed)):
            if len(given) != 1 or given[0].is_partial:
                raise PlaitError(f"boundary {s} -> {s + 1}: {what} placements {list(given)} must be one Shard(dim) "
                                 "or Replicate() on the tp axis")
    layers = [name for names in stage_layers for name in names]
    params = dict(model.named_parameters())
    for name, value in sharding.placements.items():
        if name not in params or stage_name(name, layers) is None:
            raise PlaitError(f"placements name {name!r}, which is no parameter of the stages' layers")
        if len(value) != 1:
            raise PlaitError(f"parameter {name!r} has {len(value)} placements; give one, on the tp axis")
    for pin in sharding.pins:
        if stage_name(pin.module, layers) is None:
            raise PlaitError(f"a pin names module {pin.module!r}, which is in no stage's layers")
    return sizes[0]


def _dtensor(placements: Placements) -> tuple[DTensorPlacement, ...]:
    return tuple(p.to_dtensor() for p in placements)


def _check_divides(shape: tuple[int, ...], placements: Placements, size: int) -> None:
    for p in placements:
        if p.is_shard and p.dim is not None and shape[p.dim] % size:
            raise PlaitError(f"a stage output of shape {list(shape)} is sent as {p}, but dim {p.dim} does not split "
                             f"evenly over {size} tp ranks; send another placement")
