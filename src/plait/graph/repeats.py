"""Repeated layers of a joint graph: layers with identical structure share one sharding decision.

A layer's signature lists its nodes (parameters, forward and backward ops) in graph order: kind, phase,
target, the non-tensor arguments, output shapes and dtypes, the parameter's name inside the layer, and
each tensor argument as "node j of this layer" or "a value from outside with this shape and dtype".
Layers with equal signatures form a group; node k of every layer of a group corresponds to node k of
the group's first layer (its representative). Batch inputs, constants and the output node belong to no
layer's structure: they are their own representatives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plait.graph.joint import JointNode


# Nodes that are not part of a layer's structure: the batch, constants and the graph's output.
_OUTSIDE = ("input", "constant", "output")


@dataclass(frozen=True, kw_only=True)
class Repeats:
    """Groups of structurally identical layers and the node and parameter correspondence they imply."""

    groups: tuple[tuple[int, ...], ...]  # every layer in exactly one group (singletons too), by first layer
    representative: tuple[int, ...]  # per node: the node at the same position in its group's first layer
    params: dict[str, str]  # parameter FQN -> FQN of the parameter at its position in the first layer

    @cached_property
    def group_of(self) -> dict[int, int]:
        """Layer index -> index of its group in ``groups``."""
        return {layer: g for g, group in enumerate(self.groups) for layer in group}

    @property
    def repeated(self) -> tuple[tuple[int, ...], ...]:
        """The groups of two or more layers."""
        return tuple(g for g in self.groups if len(g) > 1)


def find_repeats(nodes: Sequence[JointNode], layer_names: Sequence[str]) -> Repeats:
    """Group the layers of ``nodes`` by structure and map each node to its representative."""
    members: list[list[int]] = [[] for _ in layer_names]
    for n in nodes:
        if n.kind not in _OUTSIDE:
            members[n.layer].append(n.index)
    groups = _groups(nodes, members, layer_names)
    representative = list(range(len(nodes)))
    params = {n.param: n.param for n in nodes if n.kind == "param" and n.param is not None}
    for group in groups:
        for layer in group[1:]:
            for rep, i in zip(members[group[0]], members[layer], strict=True):
                representative[i] = rep
                if nodes[i].kind == "param":
                    params[str(nodes[i].param)] = str(nodes[rep].param)
    return Repeats(groups=tuple(groups), representative=tuple(representative), params=params)


def _groups(
    nodes: Sequence[JointNode], members: list[list[int]], layer_names: Sequence[str]
) -> list[tuple[int, ...]]:
    """Layers with equal signatures whose nodes correspond one to one; every other layer alone."""
    position = {i: k for layer in members for k, i in enumerate(layer)}
    by_signature: dict[tuple[Any, ...], list[int]] = {}
    for layer, name in enumerate(layer_names):
        sig = _signature(nodes, members[layer], layer, name, position)
        by_signature.setdefault(sig, []).append(layer)
    groups: list[tuple[int, ...]] = []
    for same_sig in by_signature.values():
        same = tuple(k for k in same_sig if _correspond(nodes, members, layer_names, same_sig[0], k))
        groups.append(same)
        groups.extend((k,) for k in same_sig if k not in same)
    return sorted(groups, key=lambda g: g[0])


def _local(fqn: str | None, layer_name: str) -> str | None:
    """``fqn`` relative to the layer (``blocks.3.mlp.fc1.weight`` in ``blocks.3`` -> ``mlp.fc1.weight``)."""
    if fqn is None or not layer_name:
        return fqn
    return fqn[len(layer_name) + 1 :] if fqn.startswith(f"{layer_name}.") else fqn


def _signature(
    nodes: Sequence[JointNode], member: list[int], layer: int, name: str, position: dict[int, int]
) -> tuple[Any, ...]:
    from plait.graph.joint import JointRef  # a cycle at import time otherwise

    def arg(value: Any) -> Any:
        if isinstance(value, JointRef):
            src = nodes[value.index]
            if src.layer == layer and value.index in position:
                return ("in", position[value.index])
            return ("out", tuple((m.shape, m.dtype) for m in src.outputs))
        if isinstance(value, tuple | list):
            return tuple(arg(v) for v in value)
        if isinstance(value, dict):
            return tuple((k, arg(v)) for k, v in value.items())
        try:
            hash(value)
        except TypeError:
            return repr(value)
        return value

    from plait.graph.boundary import BOUNDARY_OPS

    def args_of(n: JointNode) -> Any:  # a boundary marker's key differs from layer to layer
        return arg(n.args[:1]) if n.target in BOUNDARY_OPS else arg(n.args)

    return tuple(
        (
            n.kind,
            n.phase,
            n.target,
            args_of(n),
            arg(n.kwargs),
            tuple((m.shape, m.dtype) for m in n.outputs),
            _local(n.param, name),
            _local(n.grad_of, name),
            n.saved,
        )
        for n in (nodes[i] for i in member)
    )


def _correspond(
    nodes: Sequence[JointNode], members: list[list[int]], layer_names: Sequence[str], a: int, b: int
) -> bool:
    """Whether the nodes of layers ``a`` and ``b`` match one to one (op, kind, phase, shapes, parameter)."""
    first, other = members[a], members[b]
    if len(first) != len(other):
        return False
    for i, j in zip(first, other, strict=True):
        x, y = nodes[i], nodes[j]
        if (x.kind, x.phase, x.target, x.outputs) != (y.kind, y.phase, y.target, y.outputs):
            return False
        if _local(x.param, layer_names[a]) != _local(y.param, layer_names[b]):
            return False
    return True
