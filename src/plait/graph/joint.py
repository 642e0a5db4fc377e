"""The joint forward+backward ATen graph of a model and its loss: the op graph the sharding planner reads.

``make_fx`` on fake tensors traces ``fn(params, buffers, *batch)``, which computes the loss through
``torch.func.functional_call`` and then ``torch.autograd.grad(loss, params)``. The graph holds the ops DTensor
sees at run time (after CompositeImplicitAutograd decomposition: ``mm``, ``addmm``, ``view``, ``t``,
``native_layer_norm``, ... and their backward ops). Forward hooks tag each forward node with the module
running it; autograd pre-hooks on every grad_fn tag each backward node with the module of the forward op
it differentiates. Every node gets a layer of plait's layer view, its FLOPs and whether backward reads it.

Layers: a node belongs to the layer holding its module. Forward glue (ops outside every layer: a residual
add in a parent, the loss) belongs to the layer of the forward op before it (the first layer before any);
backward glue to the layer of the forward op it differentiates, else to the backward node before it.
A placeholder belongs to the layer of its first reader (an unread parameter: to its module's layer).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import torch
from torch import fx, nn

from plait.errors import CaptureError
from plait.graph.boundary import Boundary, boundary_markers
from plait.graph.diagnose import capture_error, module_stack
from plait.graph.fake import as_input_tuple, autocast_to, fake_inputs, fake_model, new_fake_mode
from plait.graph.joint_trace import JointTrace, ModuleMarks, node_flops, node_outputs, trace_joint
from plait.graph.layers import candidate_layers, order_by_call, structural_owner
from plait.graph.model_graph import TensorMeta
from plait.graph.repeats import Repeats, find_repeats
from plait.graph.trace import LossFn

_MODULE, _BWD, _SEQ = ModuleMarks.MODULE, ModuleMarks.BWD, ModuleMarks.SEQ


@dataclass(frozen=True)
class JointRef:
    """A reference to the value of node ``index`` of a JointGraph (stands for an fx.Node in args)."""

    index: int


@dataclass(frozen=True, kw_only=True)
class JointNode:
    """One node of the joint graph with what sharding rules and cost models need."""

    index: int
    name: str  # the fx node's name
    kind: str  # "param" | "buffer" | "input" | "constant" | "call" | "output"
    target: Any = None  # the OpOverload (or operator.getitem) of a "call" node; None otherwise
    args: tuple[Any, ...] = ()  # fx args, every fx.Node replaced by a JointRef; other values as they are
    kwargs: dict[str, Any] = field(default_factory=dict)
    outputs: tuple[TensorMeta, ...] = ()  # the tensors this node produces, in order (non-tensors left out)
    module: str = ""  # FQN of the innermost module that ran it ("" for the root and the loss)
    phase: str = "fwd"  # "fwd" | "bwd"
    layer: int = 0  # index into JointGraph.layer_names
    flops: int = 0
    saved: bool = False  # a forward activation (not a parameter or buffer) that a backward node reads
    param: str | None = None  # FQN of the parameter ("param") or buffer ("buffer") this placeholder is
    grad_of: str | None = None  # FQN of the parameter whose gradient this node produces

    @property
    def refs(self) -> tuple[int, ...]:
        """Indices of the nodes this node reads, in argument order (repeats kept)."""
        return tuple(r.index for r in _refs((self.args, self.kwargs)))


@dataclass(frozen=True, kw_only=True)
class JointGraph:
    """The joint forward+backward graph of a model and its loss, at the captured batch."""

    name: str
    nodes: tuple[JointNode, ...]
    params: dict[str, int]  # parameter FQN -> its placeholder node
    buffers: dict[str, int]  # buffer FQN -> its placeholder node
    grads: dict[str, int]  # parameter FQN -> the node producing its gradient (trainable, used parameters)
    inputs: tuple[int, ...]  # placeholder nodes of the batch tensors, in order
    loss: int  # the node of the loss value
    layer_names: tuple[str, ...]  # plait's layer view (module FQNs in call order)
    repeats: Repeats
    gm: fx.GraphModule | None = field(default=None, compare=False, repr=False)  # the traced graph
    boundaries: tuple[Boundary, ...] = ()  # the boundary markers' table, indexed by their key

    @cached_property
    def users(self) -> tuple[tuple[int, ...], ...]:
        """For every node, the nodes that read it (each once, in graph order)."""
        out: list[list[int]] = [[] for _ in self.nodes]
        for node in self.nodes:
            for i in dict.fromkeys(node.refs):
                out[i].append(node.index)
        return tuple(tuple(u) for u in out)

    def consumers(self, index: int) -> tuple[int, ...]:
        """The nodes that read node ``index``."""
        return self.users[index]

    def nodes_of_layer(self, layer: int, phase: str | None = None) -> tuple[JointNode, ...]:
        """Nodes of one layer in graph order (only ``phase`` "fwd"/"bwd" when given)."""
        return tuple(n for n in self.nodes if n.layer == layer and (phase is None or n.phase == phase))

    def flops(self, phase: str, layer: int | None = None) -> int:
        """FLOPs of the ``phase`` ("fwd"/"bwd") nodes, of one layer or of all."""
        return sum(n.flops for n in self.nodes if n.phase == phase and (layer is None or n.layer == layer))

    def without_repeats(self) -> JointGraph:
        """The same graph with every layer on its own (each node its own representative)."""
        alone = Repeats(groups=tuple((k,) for k in range(len(self.layer_names))),
                        representative=tuple(range(len(self.nodes))), params={p: p for p in self.params})
        return replace(self, repeats=alone)

    def representative(self, index: int) -> int:
        """The node standing for node ``index`` in its repeated-layer group (itself when not repeated)."""
        return self.repeats.representative[index]

    def __len__(self) -> int:
        """Number of nodes."""
        return len(self.nodes)


def capture_joint(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[Any, ...],
    *,
    loss_fn: LossFn | None = None,
    name: str | None = None,
    markers: bool = False,
    autocast: str | None = None,
) -> JointGraph:
    """Capture the joint forward+backward ATen graph of ``model`` and its loss on fake tensors.

    ``example_inputs`` and ``loss_fn`` mean what they mean for ``capture()``; the model is never modified.
    With ``markers`` the inputs and outputs of every module holding parameters (and of the model) pass
    boundary markers (``plait.graph.boundary``), listed in ``JointGraph.boundaries``: where the sharding
    planner may pin activations. ``autocast`` ("bf16") traces under autocast, as mixed precision runs it.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture_joint() needs an nn.Module, got {type(model).__name__}")
    inputs = as_input_tuple(example_inputs)
    mode = new_fake_mode()
    fmodel = fake_model(model, mode)
    with autocast_to(autocast):
        return joint_of_fake(fmodel, fake_inputs(inputs, mode), loss_fn, name or type(model).__name__, markers=markers)


def joint_of_fake(
    fmodel: nn.Module,
    finputs: tuple[Any, ...],
    loss_fn: LossFn | None,
    graph_name: str,
    layer_names: list[str] | None = None,
    *,
    markers: bool = False,
) -> JointGraph:
    """The JointGraph of a fake model on fake inputs (layer view from the trace unless ``layer_names``)."""
    candidates = candidate_layers(fmodel)
    marks = ModuleMarks(fmodel)
    marking: AbstractContextManager[list[Boundary]] = boundary_markers(fmodel) if markers else nullcontext([])
    with module_stack(fmodel) as stack, marking as table:
        try:
            trace = trace_joint(fmodel, finputs, loss_fn, marks)
        except CaptureError:
            raise
        except Exception as exc:
            raise capture_error(graph_name, stack.where(), exc, finputs) from exc
    if layer_names is None:
        index = {fqn: i for i, (fqn, _) in enumerate(candidates)}
        called = [index[fqn] for fqn in marks.call_order if fqn in index]
        layer_names = [candidates[i][0] for i in order_by_call(candidates, called)]
    return replace(_build(trace, graph_name, layer_names), boundaries=tuple(table))


def _build(trace: JointTrace, graph_name: str, layer_names: list[str]) -> JointGraph:
    fx_nodes = list(trace.gm.graph.nodes)
    index = {n: i for i, n in enumerate(fx_nodes)}
    kinds, names = _placeholders(fx_nodes, trace)
    layers, phases = _layers(fx_nodes, index, layer_names, names)
    out_node = fx_nodes[-1]
    returned = list(out_node.args[0]) if out_node.op == "output" else []
    grad_of = {index[g]: p for p, g in zip(trace.trainable, returned[1:], strict=False) if g is not None}
    nodes = tuple(
        JointNode(
            index=i,
            name=n.name,
            kind=kinds.get(i, "call" if n.op == "call_function" else n.op),
            target=n.target if n.op == "call_function" else None,
            args=_convert(n.args, index),
            kwargs=_convert(dict(n.kwargs), index),
            outputs=node_outputs(n, trace.gm),
            module=_custom(n).get(_MODULE, ""),
            phase=phases[i],
            layer=layers[i],
            flops=node_flops(n),
            saved=kinds.get(i) not in ("param", "buffer") and _read_by_bwd(n, index, phases),
            param=names.get(i),
            grad_of=grad_of.get(i),
        )
        for i, n in enumerate(fx_nodes)
    )
    return JointGraph(
        name=graph_name,
        nodes=nodes,
        params={names[i]: i for i, k in kinds.items() if k == "param"},
        buffers={names[i]: i for i, k in kinds.items() if k == "buffer"},
        grads={p: i for i, p in grad_of.items()},
        inputs=tuple(i for i, k in kinds.items() if k == "input" and nodes[i].outputs),
        loss=index[returned[0]] if returned else -1,
        layer_names=tuple(layer_names),
        repeats=find_repeats(nodes, layer_names),
        gm=trace.gm,
    )


def _custom(node: fx.Node) -> dict[str, Any]:
    return node.meta.get("custom") or {}


def _layers(
    fx_nodes: list[fx.Node], index: dict[fx.Node, int], names: list[str], holders: dict[int, str]
) -> tuple[list[int], list[str]]:
    """Layer and phase of every node; glue goes to a neighbouring layer (see ``docs/capture.md``)."""
    layer: list[int | None] = [None] * len(fx_nodes)
    phase = ["fwd"] * len(fx_nodes)
    fwd_layer_of_seq: dict[int, int] = {}
    previous = 0
    for i, n in enumerate(fx_nodes):
        if n.op not in ("call_function", "get_attr"):
            continue
        custom = _custom(n)
        owner = structural_owner(custom.get(_MODULE, ""), names)
        if custom.get(_BWD):
            phase[i] = "bwd"
            layer[i] = owner if owner is not None else fwd_layer_of_seq.get(custom.get(_SEQ, -1))
            continue
        previous = previous if owner is None else owner
        layer[i] = previous
        fwd_layer_of_seq.setdefault(n.meta.get("seq_nr", -1), previous)
    _fill_backward_glue(fx_nodes, layer, phase)
    _fill_placeholders(fx_nodes, layer, index, names, holders)
    return [k if k is not None else 0 for k in layer], phase


def _fill_backward_glue(fx_nodes: list[fx.Node], layer: list[int | None], phase: list[str]) -> None:
    """Backward nodes without a layer take the previous backward node's, else the next one's."""
    bwd = [i for i, p in enumerate(phase) if p == "bwd"]
    previous: int | None = None
    for i in bwd:
        layer[i] = previous = layer[i] if layer[i] is not None else previous
    following: int | None = None
    for i in reversed(bwd):
        layer[i] = following = layer[i] if layer[i] is not None else following
    if fx_nodes and fx_nodes[-1].op == "output":
        phase[-1] = "bwd" if bwd else "fwd"
        layer[-1] = next((layer[i] for i in reversed(range(len(fx_nodes) - 1)) if layer[i] is not None), 0)


def _fill_placeholders(
    fx_nodes: list[fx.Node],
    layer: list[int | None],
    index: dict[fx.Node, int],
    names: list[str],
    holders: dict[int, str],
) -> None:
    """A placeholder belongs to the layer of its first reader; an unread parameter to its module's layer."""
    for i, n in enumerate(fx_nodes):
        if n.op != "placeholder":
            continue
        first = next((index[u] for u in n.users if layer[index[u]] is not None), None)
        if first is not None:
            layer[i] = layer[first]
        elif i in holders:
            layer[i] = structural_owner(holders[i], names)


def _placeholders(fx_nodes: list[fx.Node], trace: JointTrace) -> tuple[dict[int, str], dict[int, str]]:
    """Kind ("param" | "buffer" | "input") and FQN of each placeholder, in the order fn takes them."""
    kinds: dict[int, str] = {}
    names: dict[int, str] = {}
    holders = [i for i, n in enumerate(fx_nodes) if n.op == "placeholder"]
    num_p, num_b = len(trace.param_names), len(trace.buffer_names)
    for k, i in enumerate(holders):
        if k < num_p:
            kinds[i], names[i] = "param", trace.param_names[k]
        elif k < num_p + num_b:
            kinds[i], names[i] = "buffer", trace.buffer_names[k - num_p]
        else:
            kinds[i] = "input"
    for i, n in enumerate(fx_nodes):
        if n.op == "get_attr":
            kinds[i] = "constant"
    return kinds, names


def _read_by_bwd(node: fx.Node, index: dict[fx.Node, int], phases: list[str]) -> bool:
    """Whether a forward node's value is read by a backward node."""
    return phases[index[node]] == "fwd" and any(
        phases[index[u]] == "bwd" and u.op != "output" for u in node.users
    )


def _convert(value: Any, index: dict[fx.Node, int]) -> Any:
    """fx args with every fx.Node replaced by a JointRef; lists stay lists, tuples tuples."""
    if isinstance(value, fx.Node):
        return JointRef(index[value])
    if isinstance(value, tuple):
        return tuple(_convert(v, index) for v in value)
    if isinstance(value, list):
        return [_convert(v, index) for v in value]
    if isinstance(value, dict):
        return {k: _convert(v, index) for k, v in value.items()}
    return value


def _refs(value: Any) -> list[JointRef]:
    if isinstance(value, JointRef):
        return [value]
    if isinstance(value, tuple | list):
        return [r for v in value for r in _refs(v)]
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    return []
