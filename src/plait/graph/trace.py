"""One forward and backward pass on fake tensors, measuring every candidate layer.

A forward pre/post hook pair on each layer module says which layer runs in forward; gradient hooks on
each layer's outputs (its backward starts) and inputs (its backward ends) say which layer runs in
backward. Ops outside every layer ("glue", e.g. a residual add in the parent's forward or the loss)
count in the layer that ran last in forward; in backward, in the same layer. A dispatch mode sees every
aten op and a saved-tensors hook every tensor autograd keeps for backward. In backward it also follows
the storages the pass makes until they die (``plait.graph.backward_memory``) for each layer's backward
workspace. Parameters get zero gradients before the pass, so each fresh parameter gradient is a
temporary added into them, as when micro-batches accumulate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import register_multi_grad_hook, saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from plait.graph.backward_memory import BackwardMemory
from plait.graph.fake import storage_key
from plait.graph.flops import has_formula, op_flops

aten = torch.ops.aten
LossFn = Callable[[nn.Module, tuple[Any, ...]], torch.Tensor]

# Ops that move no data and launch no kernel on their own (besides every view op).
_NO_KERNEL = {aten._unsafe_view.default, aten.detach.default, aten.alias.default, aten.lift_fresh.default}
# Queries of tensor metadata that reach the mode for some tensor subclasses; not ops of the model.
_METADATA = {
    aten.size.default,
    aten.sym_size.default,
    aten.stride.default,
    aten.sym_stride.default,
    aten.storage_offset.default,
    aten.sym_storage_offset.default,
    aten.numel.default,
    aten.sym_numel.default,
    aten.dim.default,
    aten.is_contiguous.default,
    aten.is_contiguous.memory_format,
    aten.is_strides_like_format.default,
    aten.is_non_overlapping_and_dense.default,
}


@dataclass
class LayerStats:
    """What the trace measured for one candidate layer (mutable accumulator)."""

    fwd_flops: int = 0
    bwd_flops: int = 0
    activation_bytes: int = 0
    fwd_bytes_moved: int = 0
    num_kernels: int = 0
    output_bytes: int = 0
    output_shape: tuple[int, ...] = ()
    bwd_workspace_bytes: int = 0
    bwd_param_grad_bytes: int = 0


@dataclass
class TraceResult:
    """Per-layer statistics, call order and the layer that first used each parameter storage."""

    stats: list[LayerStats]
    glue: LayerStats  # ops that ran before any layer
    call_order: list[int]
    first_use: dict[int, int | None] = field(
        default_factory=dict
    )  # param storage -> layer (None: before any)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _needing_grad(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list({id(t): t for t in tensors if t.requires_grad}.values())


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class LayerTracker:
    """Follows which candidate layer is running, in forward and in backward."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.stats = [LayerStats() for _ in modules]
        self.glue = LayerStats()
        self.current: int | None = None
        self.call_order: list[int] = []
        self._stack: list[int] = []
        self._handles: list[Any] = []

    def slot(self) -> LayerStats:
        """The accumulator of the layer running now."""
        return self.glue if self.current is None else self.stats[self.current]

    def install(self) -> None:
        """Register the hooks on the layer modules."""
        for i, m in enumerate(self.modules):
            self._handles.append(m.register_forward_pre_hook(partial(self._pre, i), with_kwargs=True))
            self._handles.append(m.register_forward_hook(partial(self._post, i), with_kwargs=True))

    def remove(self) -> None:
        """Remove every hook."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, i: int, module: nn.Module, args: Any, kwargs: Any) -> None:
        self._stack.append(i)
        self.current = i
        first_call = i not in self.call_order
        self.call_order.append(i)
        needs_grad = _needing_grad(_tensors((args, kwargs)))
        if needs_grad and first_call:
            self._handles.append(register_multi_grad_hook(needs_grad, partial(self._bwd_end, i)))

    def _post(self, i: int, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        self._stack.pop()
        self.current = self._stack[-1] if self._stack else i
        outs = _tensors(output)
        st = self.stats[i]
        if self.call_order.count(i) == 1 and outs:
            st.output_bytes = _nbytes(outs)
            st.output_shape = tuple(outs[0].shape)
        needs_grad = _needing_grad(outs)
        if needs_grad:
            self._handles.append(
                register_multi_grad_hook(needs_grad, partial(self._bwd_start, i), mode="any")
            )

    def _bwd_start(self, i: int, *grads: Any) -> None:
        self.current = i

    def _bwd_end(self, i: int, *grads: Any) -> None:
        # Glue that ran after the previous layer in forward runs now in backward: it belongs to that layer.
        k = self.call_order.index(i)
        self.current = self.call_order[k - 1] if k > 0 else i


class OpRecorder(TorchDispatchMode):
    """Counts FLOPs, kernels and bytes of each aten op into the running layer."""

    def __init__(self, tracker: LayerTracker, param_storages: set[int]) -> None:
        super().__init__()
        self.tracker = tracker
        self.param_storages = param_storages
        self.first_use: dict[int, int | None] = {}
        self.backward = BackwardMemory()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not isinstance(func, torch._ops.OpOverload) or func.namespace == "prim" or func in _METADATA:
            return func(*args, **kwargs)
        if not has_formula(func):
            # Same rule as FlopCounterMode: split a composite op so its matmuls are counted.
            with self:
                r = func.decompose(*args, **kwargs)
            if r is not NotImplemented:
                return r
        out = func(*args, **kwargs)
        self._record(func, args, kwargs, out)
        return out

    def _record(self, func: torch._ops.OpOverload, args: Any, kwargs: Any, out: Any) -> None:
        st = self.tracker.slot()
        flops = op_flops(func, args, kwargs, out)
        if torch._C._current_graph_task_id() != -1:
            st.bwd_flops += flops
            self.backward.op(self.tracker.current, _allocated(func, args, kwargs, out))
            return
        st.fwd_flops += flops
        inputs = _tensors((args, kwargs))
        for t in inputs:
            key = storage_key(t)
            if key in self.param_storages and key not in self.first_use:
                self.first_use[key] = self.tracker.current
        if func.is_view or func in _NO_KERNEL:
            return
        st.num_kernels += 1
        st.fwd_bytes_moved += _nbytes(inputs) + _nbytes(_tensors(out))


def _allocated(func: torch._ops.OpOverload, args: Any, kwargs: Any, out: Any) -> list[torch.Tensor]:
    """The outputs an op allocated: none of a view op, none that share an input's storage (in-place ops)."""
    if func.is_view or func in _NO_KERNEL:
        return []
    inputs = {storage_key(t) for t in _tensors((args, kwargs))}
    return [t for t in _tensors(out) if storage_key(t) not in inputs]


class SavedTensorCounter:
    """Adds the storage bytes of tensors saved for backward to the running layer, once per storage."""

    def __init__(self, tracker: LayerTracker, exclude: set[int]) -> None:
        self.tracker = tracker
        self.seen = set(exclude)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """saved_tensors_hooks pack hook."""
        key = storage_key(t)
        if key not in self.seen:
            self.seen.add(key)
            self.tracker.slot().activation_bytes += t.untyped_storage().nbytes()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        """saved_tensors_hooks unpack hook."""
        return t


def compute_loss(model: nn.Module, inputs: tuple[Any, ...], loss_fn: LossFn | None) -> torch.Tensor:
    """``loss_fn(model, inputs)``, or the sum of every floating-point output of ``model(*inputs)``."""
    if loss_fn is not None:
        return loss_fn(model, inputs)
    outs = [t for t in _tensors(model(*inputs)) if t.is_floating_point()]
    if not outs:
        raise TypeError("the model returned no floating-point tensor to differentiate; pass loss_fn")
    loss = outs[0].sum()
    for t in outs[1:]:
        loss = loss + t.sum()
    return loss


def _give_gradients(model: nn.Module, memory: BackwardMemory) -> list[Any]:
    """Zero gradients for the parameters that have none, so backward adds each fresh one into them; hooks
    that show each fresh gradient to ``memory`` (their handles)."""
    handles = []
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            handles.append(p.register_hook(memory.param_grad))
    return handles


def _store_workspaces(tracker: LayerTracker, memory: BackwardMemory) -> None:
    """Each layer's backward workspace into its statistics (``None``: glue before every layer)."""
    for layer, ws in memory.workspaces().items():
        slot = tracker.glue if layer is None else tracker.stats[layer]
        slot.bwd_workspace_bytes = ws.activation_grads
        slot.bwd_param_grad_bytes = ws.param_grads


def trace_layers(
    model: nn.Module, inputs: tuple[Any, ...], loss_fn: LossFn | None, layer_modules: list[nn.Module]
) -> TraceResult:
    """Run forward and backward of ``model`` (fake tensors, inside its fake mode) and measure each layer."""
    tracker = LayerTracker(layer_modules)
    params = {storage_key(p) for p in model.parameters()}
    buffers = {storage_key(b) for b in model.buffers()}
    recorder = OpRecorder(tracker, params)
    saved = SavedTensorCounter(tracker, params | buffers)
    tracker.install()
    try:
        with recorder, saved_tensors_hooks(saved.pack, saved.unpack):
            loss = compute_loss(model, inputs, loss_fn)
        if loss.numel() != 1:
            raise TypeError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        if loss.requires_grad:
            seed = torch.ones_like(loss)  # made here so it is counted in neither pass
            hooks = _give_gradients(model, recorder.backward)
            try:
                with recorder:
                    loss.backward(seed)
            finally:
                for h in hooks:
                    h.remove()
            _store_workspaces(tracker, recorder.backward)
    finally:
        tracker.remove()
    return TraceResult(tracker.stats, tracker.glue, tracker.call_order, recorder.first_use)
