"""make_fx of a model's loss and parameter gradients, each node tagged with its module and phase.

Forward: pre/post hooks on every submodule set ``current_meta["custom"]`` to the running module, which
make_fx copies into each node's meta (inside ``preserve_node_meta``). Backward: after the forward, the
forward nodes' ``seq_nr`` map each autograd node to the module that created it, and a pre-hook on every
grad_fn reachable from the loss tags the ops of its backward with that module (and ``bwd``).
``node_outputs`` and ``node_flops`` read a traced node's shapes and FLOPs from its fake values.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.fx.traceback as fx_traceback
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx
from torch.utils.hooks import RemovableHandle

from plait.graph.fake import dtype_name
from plait.graph.flops import has_formula, op_flops
from plait.graph.model_graph import TensorMeta
from plait.graph.trace import LossFn, compute_loss

_PREFIX = "model."


@dataclass(frozen=True)
class JointTrace:
    """The traced graph and what its placeholders and gradient outputs stand for."""

    gm: fx.GraphModule
    param_names: tuple[str, ...]  # FQNs of the parameter placeholders, in order
    buffer_names: tuple[str, ...]  # FQNs of the buffer placeholders (after the parameters)
    trainable: tuple[str, ...]  # FQNs of the parameters whose gradients follow the loss in the output
    # (then come the gradients of the inputs that require grad)


class _LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module, so functional_call can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn | None) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *batch: Any) -> torch.Tensor:
        return compute_loss(self.model, batch, self.loss_fn)


def _set_custom(value: dict[str, Any] | None) -> None:
    meta = fx_traceback.get_current_meta()
    if value is None:
        meta.pop("custom", None)
    else:
        meta["custom"] = value


class ModuleMarks:
    """Tags traced nodes with the module that ran them; records the first-call order of modules."""

    MODULE = "plait_module"
    BWD = "plait_bwd"
    SEQ = "plait_seq"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.call_order: list[str] = []
        self._seen: set[str] = set()
        self._outer: list[dict[str, Any] | None] = []
        self._handles: list[RemovableHandle] = []

    def install(self) -> None:
        """Register the forward hooks on every submodule."""
        for fqn, module in self.model.named_modules():
            if fqn:
                self._handles.append(module.register_forward_pre_hook(partial(self._enter, fqn)))
                self._handles.append(module.register_forward_hook(partial(self._leave, fqn)))

    def remove(self) -> None:
        """Remove every hook this object registered."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _enter(self, fqn: str, *_: Any) -> None:
        outer = fx_traceback.get_current_meta().get("custom")
        self._outer.append(outer)
        _set_custom({**(outer or {}), self.MODULE: fqn})
        if fqn not in self._seen:
            self._seen.add(fqn)
            self.call_order.append(fqn)

    def _leave(self, fqn: str, *_: Any) -> None:
        _set_custom(self._outer.pop() if self._outer else None)

    def start_backward(self, loss: torch.Tensor) -> list[RemovableHandle]:
        """Tag what follows as backward; pre-hook every grad_fn of ``loss`` with its forward module."""
        _set_custom({self.MODULE: "", self.BWD: True})
        mode = get_proxy_mode()
        module_of: dict[int, str] = {}
        if mode is not None:
            for node in mode.tracer.graph.nodes:
                seq = node.meta.get("seq_nr")
                if seq is not None and seq not in module_of:  # the op that created the grad_fn
                    module_of[seq] = (node.meta.get("custom") or {}).get(self.MODULE, "")
        handles: list[RemovableHandle] = []
        seen: set[int] = set()
        queue: deque[Any] = deque([loss.grad_fn])
        while queue:
            fn = queue.popleft()
            if fn is None or id(fn) in seen:
                continue
            seen.add(id(fn))
            seq = fn._sequence_nr()
            handles.append(fn.register_prehook(partial(self._backward_of, module_of.get(seq, ""), seq)))
            queue.extend(f for f, _ in fn.next_functions)
        return handles

    def _backward_of(self, module: str, seq: int, *_: Any) -> None:
        _set_custom({self.MODULE: module, self.BWD: True, self.SEQ: seq})


def trace_joint(
    model: nn.Module, inputs: tuple[Any, ...], loss_fn: LossFn | None, marks: ModuleMarks
) -> JointTrace:
    """make_fx (fake) of ``(loss, *grads)`` of a fake ``model`` on fake ``inputs``; the model is unchanged."""
    named_params = list(model.named_parameters())
    named_buffers = list(model.named_buffers())
    params = [p.detach().requires_grad_(p.requires_grad) for _, p in named_params]
    wrapper = _LossModule(model, loss_fn)
    trainable: list[str] = []

    def joint(plist: list[torch.Tensor], blist: list[torch.Tensor], *batch: Any) -> tuple[Any, ...]:
        state = {f"{_PREFIX}{n}": t for (n, _), t in zip(named_params, plist, strict=True)}
        state.update({f"{_PREFIX}{n}": t for (n, _), t in zip(named_buffers, blist, strict=True)})
        loss = torch.func.functional_call(wrapper, state, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise TypeError(f"loss_fn must return a scalar tensor, got {shape}")
        wrt = [(n, t) for (n, _), t in zip(named_params, plist, strict=True) if t.requires_grad]
        # Inputs that require grad get theirs too (after the parameters'), as loss.backward() would do.
        wrt += [("", t) for t in batch if isinstance(t, torch.Tensor) and t.requires_grad]
        if not wrt or not loss.requires_grad:
            return (loss,)
        handles = marks.start_backward(loss)
        try:
            grads = torch.autograd.grad(loss, [t for _, t in wrt], allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        trainable[:] = [n for n, _ in wrt if n]
        return (loss, *grads)

    marks.install()
    try:
        with fx_traceback.preserve_node_meta():
            gm = make_fx(joint, tracing_mode="fake")(params, [b for _, b in named_buffers], *inputs)
    finally:
        marks.remove()
    return JointTrace(
        gm=gm,
        param_names=tuple(n for n, _ in named_params),
        buffer_names=tuple(n for n, _ in named_buffers),
        trainable=tuple(trainable),
    )


def _value(node: fx.Node, gm: fx.GraphModule) -> Any:
    if "val" in node.meta:
        return node.meta["val"]
    if node.op == "get_attr":
        return getattr(gm, str(node.target), None)
    return None


def _metas(value: Any) -> tuple[TensorMeta, ...]:
    if isinstance(value, torch.Tensor):
        return (TensorMeta(shape=tuple(int(s) for s in value.shape), dtype=dtype_name(value.dtype)),)
    if isinstance(value, tuple | list):
        return tuple(m for v in value for m in _metas(v))
    return ()


def _vals(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return value.meta.get("val")
    if isinstance(value, tuple | list):
        return type(value)(_vals(v) for v in value)
    if isinstance(value, dict):
        return {k: _vals(v) for k, v in value.items()}
    return value


def node_flops(node: fx.Node) -> int:
    """FLOPs of a call node by torch's shape formulas (no op is run)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or not has_formula(target):
        return 0
    return op_flops(target, _vals(node.args), _vals(dict(node.kwargs)), node.meta.get("val"))


def node_outputs(node: fx.Node, gm: fx.GraphModule) -> tuple[TensorMeta, ...]:
    """Shapes and dtypes of the tensors a traced node produces, in order."""
    return _metas(_value(node, gm))
