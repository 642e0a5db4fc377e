"""Predict what DTensor does when a plan runs: walk the joint graph with the plan's parameter placements and
pinned activations, let DTensor's own propagation pick every op's placements, and record each collective.

It mirrors the runtime (``plait.runtime.tensor_parallel``): parameters are DTensors with the plan's
placements; the batch, buffers and tensors made inside the model are replicated; a pinned activation is
redistributed to its placements in forward, and its gradient to the same placements (``Partial`` read as
``Replicate``) in backward, then back through the forward redistribution as DTensor's own backward does;
the model's output leaves replicated; a gradient that ends with other placements than its parameter is
redistributed to them before the optimizer step.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor._dtensor_spec import DTensorSpec

from plait.errors import PlaitError
from plait.graph.boundary import BOUNDARY_OPS, Boundary
from plait.graph.joint import JointGraph, JointNode, JointRef
from plait.plan.placement import REPLICATE, Placement
from plait.planners.intra_op.costs import divisor_of
from plait.planners.intra_op.dtensor_bridge import (
    Placements,
    Transform,
    UnsupportedOpError,
    placements_of,
    propagate,
    spec_of,
    transforms,
)
from plait.planners.intra_op.strategies import pin_reachable

BOUNDARY, BOUNDARY_GRAD = BOUNDARY_OPS


class PropagationError(PlaitError):
    """A plan DTensor cannot run: an op without a sharding rule for the placements that reach it."""


@dataclass(frozen=True)
class CommEvent:
    """A collective the step issues: at which node, in which layer and phase, and whether it scales with the batch."""

    node: int
    layer: int
    phase: str
    transform: Transform
    per_sample: bool  # an activation's collective (grows with the batch); False for a parameter gradient's


@dataclass
class Propagation:
    """Placements of every node's outputs under a plan, the collectives they cost, and the work split."""

    specs: list[tuple[DTensorSpec | None, ...]]
    comms: list[CommEvent] = field(default_factory=list)
    divisor: list[int] = field(default_factory=list)  # how many ranks share each node's work

    def placements(self, index: int, output: int = 0) -> Placements:
        """The placements of output ``output`` of node ``index``."""
        spec = self.specs[index][output]
        assert spec is not None
        return placements_of(spec)


def _normalised(target: Placements, current: Placements) -> Placements:
    """DTensor's backward of a redistribution: a Partial target reads as Replicate when the gradient is not Partial."""
    return tuple(REPLICATE if t.is_partial and not c.is_partial else t for t, c in zip(target, current, strict=True))


def _no_partial(placements: Placements) -> Placements:
    return tuple(REPLICATE if p.is_partial else p for p in placements)


class _Walker:
    def __init__(self, joint: JointGraph, mesh: DeviceMesh, params: Mapping[str, Placements],
                 pins: Mapping[int, Placements], boundaries: tuple[Boundary, ...]) -> None:
        self.joint, self.mesh, self.params, self.pins, self.boundaries = joint, mesh, params, pins, boundaries
        self.replicated: Placements = (REPLICATE,) * mesh.ndim
        self.result = Propagation(specs=[()] * len(joint.nodes), divisor=[1] * len(joint.nodes))
        self.forward_in: dict[int, Placements] = {}

    def spec(self, node: JointNode, k: int, placements: Placements) -> DTensorSpec:
        return spec_of(self.mesh, node.outputs[k], placements)

    def value(self, ref: JointRef) -> DTensorSpec:
        specs = self.result.specs[ref.index]
        if not specs or specs[0] is None:
            raise PropagationError(f"node {self.joint.nodes[ref.index].name} has no tensor value to read")
        return specs[0]

    def record(self, node: JointNode, src: DTensorSpec, dst: DTensorSpec, per_sample: bool = True) -> None:
        for t in transforms(src, dst):
            self.result.comms.append(CommEvent(node=node.index, layer=node.layer, phase=node.phase, transform=t,
                                               per_sample=per_sample))

    def run(self) -> Propagation:
        for node in self.joint.nodes:
            self.result.specs[node.index] = self.visit(node)
        self.gradients()
        return self.result

    def visit(self, node: JointNode) -> tuple[DTensorSpec | None, ...]:
        if node.kind == "param":
            assert node.param is not None
            return (self.spec(node, 0, self.params.get(node.param, self.replicated)),)
        if node.kind in ("input", "buffer", "constant"):
            return tuple(self.spec(node, k, self.replicated) for k in range(len(node.outputs)))
        if node.kind != "call":
            return ()
        if node.target is operator.getitem:
            source, k = node.args[0], node.args[1]
            return (self.result.specs[source.index][k],)
        if node.target is BOUNDARY:
            return (self.boundary(node),)
        if node.target is BOUNDARY_GRAD:
            return (self.boundary_grad(node),)
        return self.op(node)

    def boundary(self, node: JointNode) -> DTensorSpec:
        key = int(node.args[1])
        src = self.value(node.args[0])
        self.forward_in[key] = placements_of(src)
        pinned = self.pins.get(key)
        if self.boundaries[key].module == "" and self.boundaries[key].port == "output":
            pinned = self.replicated  # the model's output leaves as a plain full tensor
        if pinned is None:
            return src
        if placements_of(src) == pinned:
            return src  # already so (a masked pending sum stays masked, as at run time)
        if not pin_reachable(placements_of(src), pinned):
            raise PropagationError(f"{self.boundaries[key]}: DTensor cannot redistribute {placements_of(src)} to the pin "
                                   f"{pinned} (a pending sum is made only where one already is)")
        dst = self.spec(node, 0, pinned)
        self.record(node, src, dst)
        return dst

    def boundary_grad(self, node: JointNode) -> DTensorSpec:
        key = int(node.args[1])
        grad = self.value(node.args[0])
        pinned = self.pins.get(key)
        if self.boundaries[key].module == "" and self.boundaries[key].port == "output":
            pinned = self.replicated
        if pinned is None:
            return grad
        pinned_grad = self.spec(node, 0, _no_partial(pinned))
        self.record(node, grad, pinned_grad)
        original = self.forward_in.get(key, pinned)
        if original == pinned:
            return pinned_grad
        back = self.spec(node, 0, _normalised(original, placements_of(pinned_grad)))
        self.record(node, pinned_grad, back)
        return back

    def op(self, node: JointNode) -> tuple[DTensorSpec | None, ...]:
        refs = node.refs
        if not refs:  # a factory op: a plain tensor, replicated where it meets DTensors
            return tuple(self.spec(node, k, self.replicated) for k in range(len(node.outputs)))
        args = _substitute(node.args, self)
        kwargs = {k: _substitute(v, self) for k, v in node.kwargs.items()}
        try:
            out, moved = propagate(node.target, args, kwargs)
        except UnsupportedOpError as exc:
            raise PropagationError(f"{node.target} in {node.module or 'the model'} ({node.phase}): {exc}") from None
        if moved is not None:
            inputs = [self.value(JointRef(r)) for r in refs if self.result.specs[r] and self.result.specs[r][0] is not None]
            for src, dst in zip(inputs, moved, strict=False):
                if src.placements != dst.placements:
                    self.record(node, src, dst)
        outs = out if isinstance(out, tuple) else (out,)
        first = next((o for o in outs if o is not None), None)
        if first is not None:
            self.result.divisor[node.index] = divisor_of(placements_of(first), self.mesh.shape)
        return tuple(outs)

    def gradients(self) -> None:
        """Gradients whose placements differ from their parameter's are redistributed before the optimizer step."""
        for name, g in self.joint.grads.items():
            grad = self.result.specs[g][0] if self.result.specs[g] else None
            if grad is None:
                continue
            node = self.joint.nodes[self.joint.params[name]]
            target = self.spec(node, 0, self.params.get(name, self.replicated))
            if grad.placements != target.placements:
                self.record(self.joint.nodes[g], grad, target, per_sample=False)


def _substitute(value: Any, walker: _Walker) -> Any:
    if isinstance(value, JointRef):
        return walker.value(value)
    if isinstance(value, tuple | list):
        return type(value)(_substitute(v, walker) for v in value)
    return value


def propagate_plan(joint: JointGraph, mesh: DeviceMesh, params: Mapping[str, Placements],
                   pins: Mapping[int, Placements], boundaries: tuple[Boundary, ...]) -> Propagation:
    """Walk ``joint`` as DTensor will run it under these parameter placements and pins (see the module docstring)."""
    return _Walker(joint, mesh, params, pins, boundaries).run()


def shard_placements(placements: Placements) -> tuple[Placement, ...]:
    """Placements with Partial read as Replicate (what a parameter can hold)."""
    return _no_partial(placements)
