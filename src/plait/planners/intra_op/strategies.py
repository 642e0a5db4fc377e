"""The candidate strategies of every decision node of a joint graph on the model-axes mesh.

What the runtime does fixes what a strategy can be. Parameters take any placement (Replicate, or Shard
of a dim the axis divides) and pinned activations any placement (module hooks redistribute them), so
those are the real decisions. Every other op runs as DTensor runs it: for each combination of the
placements its inputs may arrive with, DTensor's own propagation picks the output and the inputs it
redistributes first; that combination is one strategy, and what it redistributes is part of its cost.
The batch, buffers, constants and tensors made inside the model are replicated; ``getitem`` reads one
output of its producer. Nodes of repeated layers share their representative's decision; a gradient
marker shares its forward marker's, whose strategies are (input placement, pin, incoming gradient).
A shared decision's strategies cover the placements reaching any of its members: the first block of a
stack reads the embedding, the others read the block before.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor._dtensor_spec import DTensorSpec

from plait.graph.boundary import BOUNDARY_OPS, Boundary
from plait.graph.joint import JointGraph, JointNode, JointRef
from plait.plan.placement import REPLICATE
from plait.planners.intra_op.dtensor_bridge import (
    Placements,
    UnsupportedOpError,
    candidate_placements,
    placements_of,
    propagate,
    spec_of,
)

BOUNDARY, BOUNDARY_GRAD = BOUNDARY_OPS
FULL_PRODUCT = 64  # up to this many input-placement combinations an op is enumerated on all of them


@dataclass(frozen=True)
class Source:
    """Where a tensor input comes from: output ``output`` of node ``node`` (through ``getitem``)."""

    node: int
    output: int


@dataclass(frozen=True)
class Strategy:
    """One way a node runs: the placements its tensor inputs arrive with, its outputs' placements, and the
    redistributions it does first (each as (input position, target placements))."""

    inputs: tuple[Placements, ...]
    outputs: tuple[Placements | None, ...]
    moves: tuple[tuple[int, Placements], ...] = ()
    pin: Placements | None = None  # a boundary marker's pinned placements


@dataclass
class NodeChoices:
    """A decision node's strategies, and for each tensor input the node and output that produce it."""

    node: int
    strategies: list[Strategy]
    sources: list[Source]


def source_of(joint: JointGraph, index: int) -> Source:
    """The producer of the value of node ``index``, looking through ``getitem``."""
    node = joint.nodes[index]
    if node.kind == "call" and node.target is operator.getitem:
        return Source(node=node.args[0].index, output=int(node.args[1]))
    return Source(node=index, output=0)


def is_decision(node: JointNode) -> bool:
    """Nodes that carry a choice: placeholders with tensors and calls other than ``getitem``."""
    if not node.outputs:
        return False
    return node.kind in ("param", "input", "buffer", "constant") or (node.kind == "call" and node.target is not operator.getitem)


def forward_marker(joint: JointGraph, key: int) -> int:
    """The node of the forward boundary marker with this key."""
    cache = joint.__dict__.setdefault("_plait_markers", {})
    if not cache:
        for n in joint.nodes:
            if n.kind == "call" and n.target is BOUNDARY:
                cache[int(n.args[1])] = n.index
    return int(cache[key])


def gradient_marker(joint: JointGraph, key: int) -> int | None:
    """The node of the gradient marker with this key (None when the activation needs no gradient)."""
    cache = joint.__dict__.setdefault("_plait_grad_markers", {})
    if not cache:
        cache[-1] = -1
        for n in joint.nodes:
            if n.kind == "call" and n.target is BOUNDARY_GRAD:
                cache[int(n.args[1])] = n.index
    found = cache.get(key)
    return None if found is None else int(found)


def decision_key(joint: JointGraph, node: JointNode) -> int:
    """The node whose decision ``node`` shares: its repeated-layer representative; for a gradient marker,
    the representative of its forward marker."""
    if node.kind == "call" and node.target is BOUNDARY_GRAD:
        return joint.representative(forward_marker(joint, int(node.args[1])))
    return joint.representative(node.index)


class Enumerator:
    """Strategies per node; ops are enumerated once per distinct signature and input placements."""

    def __init__(self, joint: JointGraph, mesh: DeviceMesh, boundaries: Sequence[Boundary], *,
                 allow_partial_pins: bool = True, batch_on_model_axes: bool = False) -> None:
        self.joint, self.mesh, self.boundaries = joint, mesh, boundaries
        self.shape = tuple(mesh.shape)
        self.replicated: Placements = (REPLICATE,) * mesh.ndim
        self.allow_partial_pins = allow_partial_pins
        self.batch_on_model_axes = batch_on_model_axes
        self.cache: dict[Any, list[Strategy]] = {}
        self.outputs: dict[tuple[int, int], list[Placements]] = {}
        self.strategies_of: dict[int, list[Strategy]] = {}
        self.members: dict[int, list[int]] = {}
        for n in joint.nodes:
            self.members.setdefault(joint.representative(n.index), []).append(n.index)

    def choices(self, node: JointNode) -> NodeChoices:
        """The strategies of one decision node (its inputs' producers enumerated before, where possible)."""
        sources = [source_of(self.joint, r) for r in node.refs]
        return NodeChoices(node=node.index, strategies=self._strategies(node, sources), sources=sources)

    def member_sources(self, index: int) -> list[list[Source]]:
        """The sources of node ``index`` and of every node sharing its decision (one list per member)."""
        nodes = self.joint.nodes
        return [[source_of(self.joint, r) for r in nodes[m].refs] for m in self.members.get(index, [index])]

    def outputs_reaching(self, sources: Sequence[Source]) -> list[Placements]:
        """The placements any of ``sources`` may produce (in order, without repeats)."""
        seen: dict[Placements, None] = {}
        for s in sources:
            seen.update(dict.fromkeys(self.outputs_of(s)))
        return list(seen)

    def _strategies(self, node: JointNode, sources: list[Source]) -> list[Strategy]:
        if node.kind == "param":
            return [Strategy(inputs=(), outputs=(p,)) for p in candidate_placements(node.outputs[0], self.shape, partial=False)]
        if node.kind != "call" or not sources:
            return [Strategy(inputs=(), outputs=(self.replicated,) * len(node.outputs))]
        if node.target in BOUNDARY_OPS:
            return self._marker(node, sources)
        return self._op(node, sources)

    def pins(self, key: int) -> list[Placements]:
        """The placements a pin of this boundary may give."""
        b = self.boundaries[key]
        if b.module == "" and b.port == "output":
            return [self.replicated]  # the model's output leaves as a plain full tensor
        meta = self.joint.nodes[forward_marker(self.joint, key)].outputs[0]
        found = candidate_placements(meta, self.shape, partial=self.allow_partial_pins)
        if self.batch_on_model_axes:
            return found
        # an activation's dim 0 is its batch: the batch is split on data-parallel axes only (Alpa's force_batch_dim)
        return [p for p in found if not any(x.is_shard and x.dim == 0 for x in p)]

    def _marker(self, node: JointNode, sources: list[Source]) -> list[Strategy]:
        """Strategies of a marker key: (forward input, pin, incoming gradient); both markers use the same list."""
        key = int(node.args[1])
        forward = self.joint.representative(forward_marker(self.joint, key))
        ins = self.outputs_reaching([m[0] for m in self.member_sources(forward)])
        grad_nodes = [gradient_marker(self.joint, int(self.joint.nodes[m].args[1])) for m in self.members.get(forward, [forward])]
        grad_sources = [source_of(self.joint, self.joint.nodes[g].refs[0]) for g in grad_nodes if g is not None]
        grads: Sequence[Placements | None] = self.outputs_reaching(grad_sources) if grad_sources else [None]
        out = []
        for a, pin, g in product(ins, self.pins(key), grads):
            if not pin_reachable(a, pin):
                continue
            if node.target is BOUNDARY:
                out.append(Strategy(inputs=(a,), outputs=(pin,), moves=((0, pin),) if a != pin else (), pin=pin))
            else:
                assert g is not None
                out.append(self._gradient(a, pin, g))
        return out

    def _gradient(self, forward_in: Placements, pin: Placements, grad: Placements) -> Strategy:
        """The gradient side of a pin: to the pinned placements (a pending sum reduced), then back through the
        forward redistribution as DTensor's backward does (Partial reads as Replicate)."""
        pinned = tuple(REPLICATE if p.is_partial else p for p in pin)
        moves: list[tuple[int, Placements]] = [(0, pinned)] if grad != pinned else []
        out = pinned
        if forward_in != pin:
            back = tuple(REPLICATE if t.is_partial and not c.is_partial else t for t, c in zip(forward_in, pinned, strict=True))
            if back != pinned:
                moves.append((0, back))
            out = back
        return Strategy(inputs=(grad,), outputs=(out,), moves=tuple(moves), pin=pin)

    def _op(self, node: JointNode, sources: list[Source]) -> list[Strategy]:
        combos = self._combinations(sources, self.member_sources(node.index))
        metas = tuple(self.joint.nodes[s.node].outputs[s.output] for s in sources)
        key = (node.target, _freeze(node.args), _freeze(node.kwargs), metas, tuple(combos))
        if key not in self.cache:
            self.cache[key] = self._propagated(node, sources, combos)
        return self.cache[key]

    def _combinations(self, sources: list[Source], members: list[list[Source]]) -> list[tuple[Placements, ...]]:
        """The input placements an op may see (from the producers of any member of its decision). Inputs
        from one producer (the outputs of one layer norm or attention, the pieces of one split) arrive
        together as one of the producer's strategies gives them."""
        producers: dict[int, list[int]] = {}
        for k, s in enumerate(sources):
            producers.setdefault(self.joint.representative(s.node), []).append(k)
        groups: list[list[int]] = []
        options: list[list[tuple[Placements, ...]]] = []
        for rep, positions in producers.items():
            known = self.strategies_of.get(rep)
            same = all(self.joint.representative(m[k].node) == rep for m in members for k in positions)
            if known is None or len(positions) == 1 or not same:
                groups.extend([k] for k in positions)
                options.extend([(p,) for p in self.outputs_reaching([m[k] for m in members])] for k in positions)
                continue
            seen: dict[tuple[Placements, ...], None] = {}
            for st in known:
                picked = tuple(st.outputs[sources[k].output] for k in positions)
                if all(p is not None for p in picked):
                    seen[picked] = None  # type: ignore[index]
            groups.append(positions)
            options.append(list(seen) or [tuple(self.replicated for _ in positions)])
        out = []
        for combo in combinations(options):
            full: list[Placements] = [self.replicated] * len(sources)
            for positions, part in zip(groups, combo, strict=True):
                for k, p in zip(positions, part, strict=True):
                    full[k] = p
            out.append(tuple(full))
        return out

    def _propagated(self, node: JointNode, sources: list[Source], combos: list[tuple[Placements, ...]]) -> list[Strategy]:
        """DTensor's choice for each combination of input placements."""
        out = []
        position = {r: k for k, r in enumerate(node.refs)}
        for combo in combos:
            args = _specs(node.args, self, combo, position)
            kwargs = {k: _specs(v, self, combo, position) for k, v in node.kwargs.items()}
            try:
                found, moved = propagate(node.target, args, kwargs)
            except (UnsupportedOpError, RuntimeError, AssertionError, TypeError, ValueError, IndexError):
                continue
            outs = found if isinstance(found, tuple) else (found,)
            outputs = tuple(placements_of(o) if isinstance(o, DTensorSpec) else None for o in outs)
            moves = tuple((k, placements_of(m)) for k, m in enumerate(moved or ()) if k < len(combo) and placements_of(m) != combo[k])
            out.append(Strategy(inputs=tuple(combo), outputs=outputs, moves=moves))
        if not out:
            raise UnsupportedOpError(f"DTensor cannot run {node.target} ({node.module or 'model'}) on any placement of its inputs")
        return out

    def outputs_of(self, source: Source) -> list[Placements]:
        """The placements a producer's output may have (replicated until it is enumerated)."""
        return self.outputs.get((self.joint.representative(source.node), source.output), [self.replicated])

    def remember(self, choices: NodeChoices) -> None:
        """Record the output placements a node may produce, for its consumers."""
        node = self.joint.nodes[choices.node]
        self.strategies_of[choices.node] = choices.strategies
        for k in range(len(node.outputs)):
            seen: dict[Placements, None] = {}
            for s in choices.strategies:
                if k < len(s.outputs) and s.outputs[k] is not None:
                    seen[s.outputs[k]] = None  # type: ignore[index]
            self.outputs[(choices.node, k)] = list(seen) or [self.replicated]


def pin_reachable(value: Placements, pin: Placements) -> bool:
    """True when DTensor can redistribute ``value`` to ``pin``: it makes a pending sum only from one already there."""
    return all(not p.is_partial or v == p for v, p in zip(value, pin, strict=True))


def combinations(options: list[list[Any]]) -> list[tuple[Any, ...]]:
    """The input-placement combinations an op is enumerated on: all of them when there are at most
    FULL_PRODUCT; otherwise the uniform ones (every input with the same placements where it may have
    them, else its first) and those where one input departs from a uniform one. An op whose inputs are
    split in two different ways at once would have to move most of them; plans never use that."""
    total = 1
    for o in options:
        total *= max(1, len(o))
    if total <= FULL_PRODUCT:
        return list(product(*options))
    chosen: dict[tuple[Any, ...], None] = {}
    uniform = [tuple(p if p in o else o[0] for o in options) for p in dict.fromkeys(x for o in options for x in o)]
    for base in uniform:
        chosen[base] = None
    for base in uniform:
        for k, o in enumerate(options):
            for p in o:
                chosen[base[:k] + (p,) + base[k + 1:]] = None
    return list(chosen)


def _specs(value: Any, e: Enumerator, combo: tuple[Placements, ...], position: dict[int, int]) -> Any:
    """Args with each tensor reference replaced by its spec in this combination."""
    if isinstance(value, JointRef):
        s = source_of(e.joint, value.index)
        return spec_of(e.mesh, e.joint.nodes[s.node].outputs[s.output], combo[position[value.index]])
    if isinstance(value, tuple | list):
        return type(value)(_specs(v, e, combo, position) for v in value)
    return value


def _freeze(value: Any) -> Any:
    if isinstance(value, JointRef):
        return ("ref",)
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value if isinstance(value, int | float | str | bool | type(None)) else repr(value)
