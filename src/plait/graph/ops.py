"""The op graph: torch.export of the fake model, one OpNode per aten call with shapes, module and FLOPs.

The graph is export's training IR (``aten.linear``, ``aten.layer_norm``,
``aten.scaled_dot_product_attention``, ...), not lowered further, so tensor-parallel styles map onto it.
Each node's FLOPs are counted by running it once on its fake input values under the same counting mode
as the layer trace, so the forward FLOPs of the ops of a layer add up to that layer's ``fwd_flops``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_leaves, tree_map

from plait.errors import CaptureError
from plait.graph.diagnose import first_line
from plait.graph.fake import dtype_name
from plait.graph.layers import structural_owner
from plait.graph.model_graph import OpNode, TensorMeta
from plait.graph.trace import LayerTracker, LossFn, OpRecorder, compute_loss

_WRAPPER_PREFIX = "model."


class _LossModule(nn.Module):
    """Wraps ``loss_fn(model, batch)`` as a module so export traces model and loss together."""

    def __init__(self, model: nn.Module, loss_fn: LossFn | None) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *batch: Any) -> torch.Tensor:
        return compute_loss(self.model, batch, self.loss_fn)


def _metas(value: Any) -> tuple[TensorMeta, ...]:
    return tuple(
        TensorMeta(shape=tuple(int(s) for s in t.shape), dtype=dtype_name(t.dtype))
        for t in tree_leaves(value)
        if isinstance(t, torch.Tensor)
    )


def _module_of(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    return path.removeprefix(_WRAPPER_PREFIX) if path != "model" else ""


def _node_flops(node: fx.Node, tracker: LayerTracker) -> int:
    """FLOPs of one node, counted by running its op on the fake values of its inputs (inside the recorder)."""
    if node.target.is_view:  # type: ignore[union-attr]
        return 0
    args, kwargs = tree_map(
        lambda a: a.meta.get("val") if isinstance(a, fx.Node) else a, (node.args, node.kwargs)
    )
    tracker.glue.fwd_flops = 0
    node.target(*args, **kwargs)  # type: ignore[operator]
    return tracker.glue.fwd_flops


def _producers(node: fx.Node, names: dict[str, str]) -> tuple[str, ...]:
    out = []
    for a in node.all_input_nodes:
        while a.op == "call_function" and a.target is operator.getitem:
            a = a.all_input_nodes[0]
        out.append(names.get(a.name, a.name))
    return tuple(out)


def _layer_of(module: str, layer_names: list[str], previous: int) -> int:
    """Layer holding ``module``; an op outside every layer belongs to the layer that ran before it."""
    owner = structural_owner(module, layer_names)
    return previous if owner is None else owner


def _placeholder_names(ep: torch.export.ExportedProgram) -> dict[str, str]:
    sig = ep.graph_signature
    named = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    return {k: v.removeprefix(_WRAPPER_PREFIX) for k, v in named.items()}


def _export(model: nn.Module, inputs: tuple[Any, ...], loss_fn: LossFn | None, graph_name: str) -> Any:
    try:
        return torch.export.export(_LossModule(model, loss_fn), inputs, strict=False)
    except Exception as exc:
        raise CaptureError(
            f"cannot export the op graph of {graph_name}: {type(exc).__name__}: {first_line(exc)}. "
            "The layer view was captured; torch.export could not trace the model (see its message). "
            "Pass with_ops=False to capture without the op graph."
        ) from exc


def export_ops(
    model: nn.Module,
    inputs: tuple[Any, ...],
    loss_fn: LossFn | None,
    mode: FakeTensorMode,
    layer_names: list[str],
    graph_name: str,
) -> tuple[OpNode, ...]:
    """OpNodes of the forward graph (model and loss) of a fake ``model`` on fake ``inputs``."""
    with mode:
        ep = _export(model, inputs, loss_fn, graph_name)
    names = _placeholder_names(ep)
    tracker = LayerTracker([])
    with mode, OpRecorder(tracker, set()), torch.no_grad():
        return tuple(_op_nodes(ep, names, layer_names, tracker))


def _op_nodes(
    ep: torch.export.ExportedProgram, names: dict[str, str], layer_names: list[str], tracker: LayerTracker
) -> list[OpNode]:
    ops = []
    last_layer = 0
    for node in ep.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        args = list(node.all_input_nodes)
        module = _module_of(node)
        last_layer = _layer_of(module, layer_names, last_layer)
        ops.append(
            OpNode(
                name=node.name,
                target=str(node.target),
                module=module,
                inputs=tuple(m for a in args for m in _metas(a.meta.get("val"))),
                outputs=_metas(node.meta.get("val")),
                flops=_node_flops(node, tracker),
                layer=last_layer,
                input_nodes=_producers(node, names),
            )
        )
    return ops
