"""Build the intra-op ILP of a joint graph: one decision per representative node, costs from the CostTable.

Objective: the compute each strategy leaves on a rank, the collectives of every resharding between a
producer's output placement and the placement its consumer needs (forward and backward ops alike), and
per parameter its optimizer step and data-parallel gradient synchronisation. Memory: per parameter its
state (parameter, gradient, optimizer) and per saved activation its shard.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from plait.errors import PlaitError
from plait.graph.boundary import BOUNDARY_OPS, Boundary
from plait.graph.joint import JointGraph, JointNode
from plait.graph.model_graph import TensorMeta as PlaitMeta
from plait.planners.ilp import ILPEdge, ILPProblem
from plait.planners.intra_op.costs import INF, CostTable, DataParallel, divisor_of, local_bytes
from plait.planners.intra_op.dtensor_bridge import Placements
from plait.planners.intra_op.strategies import (
    BOUNDARY,
    BOUNDARY_GRAD,
    Enumerator,
    NodeChoices,
    Strategy,
    decision_key,
    is_decision,
    source_of,
)

HEAVY_OPS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product", "convolution")
MAX_PASSES = 6


@dataclass(frozen=True)
class ProblemOptions:
    """Knobs of the ILP: optimizer states per element, gradient-reduction width, Alpa's heavy-op rule."""

    optimizer_states: int = 2
    reduce_ratio: float = 1.0  # bytes of the reduced gradient per byte of parameter
    replicated_heavy_ops: bool = True  # False: every matmul/attention split on every model axis (Alpa's default rule)
    memory_limit: float | None = None
    allow_partial_pins: bool = True


@dataclass
class IntraOpProblem:
    """The ILP and how its nodes map back to the joint graph."""

    ilp: ILPProblem
    keys: list[int]  # the decision key of each ILP node
    choices: dict[int, NodeChoices]  # enumerated strategies of every representative node
    members: dict[int, list[int]] = field(default_factory=dict)  # key -> the graph nodes that share it
    graph: JointGraph | None = None  # the graph the problem was built on (its repeats decide the keys)


def _replicated_somewhere(placements: Placements, shape: tuple[int, ...]) -> bool:
    """True when an op's output is replicated on a model axis of more than one rank (its work done twice)."""
    return any(size > 1 and p.is_replicate for size, p in zip(shape, placements, strict=True))


def _heavy(node: JointNode) -> bool:
    name = str(node.target)
    return node.flops > 0 and any(f"aten.{h}" in name for h in HEAVY_OPS)


def enumerate_choices(joint: JointGraph, enumerator: Enumerator) -> dict[int, NodeChoices]:
    """Strategies of every representative decision node, in graph order, until the output sets settle
    (a repeated layer's backward reads values its own representative produces later in graph order)."""
    reps = [n for n in joint.nodes if is_decision(n) and joint.representative(n.index) == n.index]
    choices: dict[int, NodeChoices] = {}
    for _ in range(MAX_PASSES):
        before = {k: list(v) for k, v in enumerator.outputs.items()}
        for node in reps:
            found = enumerator.choices(node)
            choices[node.index] = found
            enumerator.remember(found)
        if enumerator.outputs == before:
            return choices
    raise PlaitError(f"the placements reaching {joint.name}'s ops did not settle after {MAX_PASSES} passes; "
                     "report this model to plait's maintainers")


def build_problem(joint: JointGraph, enumerator: Enumerator, table: CostTable, dp: DataParallel,
                  options: ProblemOptions) -> IntraOpProblem:
    """The ILP over the decision keys of ``joint`` (see the module docstring)."""
    choices = enumerate_choices(joint, enumerator)
    members: dict[int, list[int]] = defaultdict(list)
    for n in joint.nodes:
        if is_decision(n):
            members[decision_key(joint, n)].append(n.index)
    keys = sorted(members)
    slot = {k: i for i, k in enumerate(keys)}
    size = {k: len(choices[joint.representative(k)].strategies) for k in keys}
    costs = [np.zeros(size[k]) for k in keys]
    memory = [np.zeros(size[k]) for k in keys]
    shape = tuple(enumerator.mesh.shape)
    for k in keys:
        for i in members[k]:
            _node_terms(joint, joint.nodes[i], choices[joint.representative(i)], table, dp, options, shape,
                        costs[slot[k]], memory[slot[k]])
    edges = _edges(joint, choices, members, slot, table, costs)
    problem = ILPProblem(costs=costs, memory=memory, edges=edges, memory_limit=options.memory_limit,
                         names=[f"{joint.nodes[k].name} ({joint.nodes[k].module or 'model'})" for k in keys])
    return IntraOpProblem(ilp=problem, keys=keys, choices=choices, members=dict(members), graph=joint)


def _node_terms(joint: JointGraph, node: JointNode, found: NodeChoices, table: CostTable, dp: DataParallel,
                options: ProblemOptions, shape: tuple[int, ...], cost: np.ndarray, memory: np.ndarray) -> None:
    """Add one graph node's compute, redistribution, parameter and memory terms to its decision's arrays."""
    for c, s in enumerate(found.strategies):
        out = s.outputs[0] if s.outputs and s.outputs[0] is not None else None
        if node.kind == "param" and out is not None:
            meta = node.outputs[0]
            cost[c] += table.param(meta, out, dp, options.reduce_ratio)
            fsdp = len(dp.groups[-1]) if dp.sharded else 1
            memory[c] += local_bytes(meta, out, shape) * (2 + options.optimizer_states) / fsdp
            continue
        if node.kind != "call" or out is None:
            continue
        cost[c] += _moves(joint, node, found, s, table)
        if node.target in BOUNDARY_OPS:
            continue
        cost[c] += table.compute(node.flops, divisor_of(out, shape))
        if not options.replicated_heavy_ops and _heavy(node) and _replicated_somewhere(out, shape):
            cost[c] = INF
        if node.saved:
            memory[c] += sum(local_bytes(m, p, shape) for m, p in zip(node.outputs, s.outputs, strict=False) if p is not None)


def _moves(joint: JointGraph, node: JointNode, found: NodeChoices, s: Strategy, table: CostTable) -> float:
    """What a strategy redistributes before it runs (in order; a marker's gradient may move twice)."""
    total = 0.0
    current = list(s.inputs)
    for k, target in s.moves:
        src = found.sources[k]
        meta = joint.nodes[src.node].outputs[src.output]
        total += table.reshard(meta, current[k], target)
        current[k] = target
    return total


def _edges(joint: JointGraph, choices: dict[int, NodeChoices], members: dict[int, list[int]], slot: dict[int, int],
           table: CostTable, costs: list[np.ndarray]) -> list[ILPEdge]:
    """One ILP edge per distinct (producer decision, output, consumer decision, input), with its multiplicity.

    A value reaches its consumer with the placements it was produced with (the consumer's strategies
    list every combination it may see), so these edges only require equality; a parameter's gradient
    is redistributed to the parameter's placements before the optimizer step, which costs what it costs.
    """
    counts: dict[tuple[int, int, int, int, int, int], int] = defaultdict(int)
    for k, nodes in members.items():
        for v in nodes:
            rep_v = joint.representative(v)
            for i, ref in enumerate(joint.nodes[v].refs):  # this node's own producers, not its representative's
                src = source_of(joint, ref)
                rep_p = joint.representative(src.node)
                counts[(decision_key(joint, joint.nodes[src.node]), rep_p, src.output, k, rep_v, i)] += 1
    for name, g in joint.grads.items():  # input -1: the gradient meets its parameter's placements
        src = source_of(joint, g)
        param = joint.params[name]
        key = (decision_key(joint, joint.nodes[src.node]), joint.representative(src.node), src.output,
               decision_key(joint, joint.nodes[param]), joint.representative(param), -1)
        counts[key] += 1
    edges = []
    for (pk, rep_p, out, vk, rep_v, i), count in counts.items():
        producer, consumer = choices[rep_p], choices[rep_v]
        meta = joint.nodes[rep_p].outputs[out]
        src_places = [s.outputs[out] if out < len(s.outputs) else None for s in producer.strategies]
        dst_places = [s.inputs[i] if i >= 0 else s.outputs[0] for s in consumer.strategies]

        if pk == vk:  # the same decision at both ends
            for c, (a, b) in enumerate(zip(src_places, dst_places, strict=True)):
                costs[slot[vk]][c] += count * _pair(table, meta, a, b, i < 0)
            continue
        src_labels, src_groups = _group(src_places)
        dst_labels, dst_groups = _group(dst_places)
        matrix = np.array([[_pair(table, meta, a, b, i < 0) for b in dst_groups] for a in src_groups])
        edges.append(ILPEdge(src=slot[pk], dst=slot[vk], src_groups=src_labels, dst_groups=dst_labels, costs=matrix, count=count))
    return edges


def _pair(table: CostTable, meta: PlaitMeta, a: Placements | None, b: Placements | None, reshard: bool) -> float:
    """An edge's cost for producer placements ``a`` and consumer placements ``b``."""
    if a is None or b is None:
        return INF
    if reshard:
        return table.reshard(meta, a, b)
    return 0.0 if a == b else INF


def _group(places: Sequence[Placements | None]) -> tuple[np.ndarray, list[Placements | None]]:
    index: dict[Placements | None, int] = {}
    labels = [index.setdefault(p, len(index)) for p in places]
    return np.array(labels, dtype=np.int64), list(index)


def chosen(problem: IntraOpProblem, joint: JointGraph, choice_of_key: Sequence[int]) -> dict[int, int]:
    """The strategy index of every decision node from the ILP's choices."""
    out = {}
    for key, c in zip(problem.keys, choice_of_key, strict=True):
        for node in problem.members[key]:
            out[node] = c
    return out


def boundaries_of(joint: JointGraph) -> tuple[Boundary, ...]:
    """The boundary table of a joint graph captured with markers (empty otherwise)."""
    return tuple(getattr(joint, "boundaries", ()))


def layout_choices(problem: IntraOpProblem, params: Mapping[str, Placements],
                   pins: Mapping[int, Placements]) -> list[int] | None:
    """The choice of every decision key that a layout given by hand makes (parameter placements, pins by boundary key),
    for ``evaluate``; None when the layout is outside the ILP's space.

    Each op takes the strategy of the placements its inputs arrive with. A boundary without a pin is pinned to the
    placements its value arrives with: its gradient is then reduced at the boundary rather than in the op after it
    (the same collective).
    """
    joint = problem.graph
    assert joint is not None, "the problem does not hold its graph"
    allowed: dict[int, set[int]] = {}
    value: dict[tuple[int, int], Placements] = {}
    arrived: dict[int, Placements] = {}  # boundary key -> the placements its forward value arrived with
    for node in joint.nodes:
        if not is_decision(node):
            continue
        found = problem.choices[joint.representative(node.index)]
        ins = tuple(value[(src.node, src.output)] for src in (source_of(joint, r) for r in node.refs))
        if node.target is BOUNDARY:
            arrived[int(node.args[1])] = ins[0]
        key = decision_key(joint, node)
        fits = {c for c, s in enumerate(found.strategies) if _takes(joint, node, s, ins, params, pins, arrived)}
        allowed[key] = allowed.get(key, fits) & fits
        if not allowed[key]:
            return None
        for k, p in enumerate(found.strategies[min(allowed[key])].outputs):
            if p is not None:
                value[(node.index, k)] = p
    return [min(allowed[k]) for k in problem.keys]


def _takes(joint: JointGraph, node: JointNode, s: Strategy, ins: tuple[Placements, ...], params: Mapping[str, Placements],
           pins: Mapping[int, Placements], arrived: Mapping[int, Placements]) -> bool:
    """Whether strategy ``s`` of ``node`` is what a layout makes of it, its inputs arriving with ``ins``."""
    if node.kind == "param":
        want = params.get(node.param or "")
        out = s.outputs[0]
        return out is not None and (out == want if want is not None else all(p.is_replicate for p in out))
    if node.kind != "call" or not node.refs:
        return True  # a placeholder or a tensor made inside the model: replicated, its one strategy
    if node.target in (BOUNDARY, BOUNDARY_GRAD):
        key = int(node.args[1])
        pin = pins.get(key, arrived[key])
        b = joint.boundaries[key]
        return s.inputs == ins and (s.pin == pin or (b.module == "" and b.port == "output"))
    return s.inputs == ins
