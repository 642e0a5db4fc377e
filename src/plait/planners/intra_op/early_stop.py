"""Where the recomputation of a layer stops.

torch's non-reentrant activation checkpointing runs a layer's forward again in backward only until the
op that saves the layer's last tensor for backward has run (its early stop): the ops after it, and the
collectives they issue (a row-split layer's output all-reduce, a pin at the end of the layer), are not
run again. Whether an op saves tensors is read from its autograd node, by running it once on meta
tensors (remembered per op and argument shapes).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from plait.graph.boundary import BOUNDARY_OPS
from plait.graph.joint import JointGraph, JointNode, JointRef
from plait.graph.model_graph import TensorMeta
from plait.planners.intra_op.dtensor_bridge import TORCH_DTYPES

_SAVES: dict[Any, bool] = {}


def last_saving_node(joint: JointGraph, in_layer: Callable[[JointNode], bool], layer: int) -> int:
    """Index of the last forward node of ``layer`` (among those ``in_layer`` accepts) whose op saves a tensor for
    backward; -1 when none does (recomputing the layer then runs nothing)."""
    last = -1
    for node in joint.nodes:
        if node.layer == layer and node.phase == "fwd" and node.kind == "call" and in_layer(node) and saves(joint, node):
            last = node.index
    return last


def saves(joint: JointGraph, node: JointNode) -> bool:
    """Whether running ``node``'s op with autograd saves any tensor for backward (True when it cannot be tried)."""
    if node.target in BOUNDARY_OPS or node.target is operator.getitem or not callable(node.target):
        return False
    args, kwargs = _with_metas(joint, tuple(node.args)), _with_metas(joint, dict(node.kwargs))
    key = (node.target, _frozen(args), _frozen(kwargs))
    if key not in _SAVES:
        _SAVES[key] = _run_and_look(node.target, _tensors(args), _tensors(kwargs))
    return _SAVES[key]


def _run_and_look(target: Callable[..., Any], args: Any, kwargs: Any) -> bool:
    try:
        with torch.enable_grad():
            out = target(*args, **kwargs)
    except Exception:  # an op that cannot run on meta tensors: assume it saves (recomputation runs through it)
        return True
    nodes = {t.grad_fn for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.grad_fn is not None}
    return any(_holds_tensors(fn) for fn in nodes)


def _holds_tensors(grad_fn: Any) -> bool:
    for name in dir(grad_fn):
        if not name.startswith("_saved_"):
            continue
        try:
            value = getattr(grad_fn, name)
        except RuntimeError:  # freed or undefined
            continue
        if isinstance(value, torch.Tensor) or (isinstance(value, tuple | list) and any(isinstance(v, torch.Tensor) for v in value)):
            return True
    return False


def _with_metas(joint: JointGraph, value: Any) -> Any:
    """``value`` with every JointRef replaced by the TensorMeta of the value it reads."""
    if isinstance(value, JointRef):
        node = joint.nodes[value.index]
        if node.kind == "call" and node.target is operator.getitem:
            return joint.nodes[node.args[0].index].outputs[int(node.args[1])]
        return node.outputs[0]
    if isinstance(value, tuple | list):
        return type(value)(_with_metas(joint, v) for v in value)
    if isinstance(value, dict):
        return {k: _with_metas(joint, v) for k, v in value.items()}
    return value


def _tensors(value: Any) -> Any:
    """``value`` with every TensorMeta made a meta tensor (requiring grad when floating)."""
    if isinstance(value, TensorMeta):
        dtype = TORCH_DTYPES.get(value.dtype, torch.float32)
        return torch.empty(value.shape, dtype=dtype, device="meta", requires_grad=dtype.is_floating_point)
    if isinstance(value, tuple | list):
        return type(value)(_tensors(v) for v in value)
    if isinstance(value, dict):
        return {k: _tensors(v) for k, v in value.items()}
    return value


def _frozen(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _frozen(v)) for k, v in value.items())
    return value if isinstance(value, TensorMeta | int | float | str | bool | type(None)) else repr(value)
