"""capture(): a model plus example inputs -> ModelGraph, on fake tensors (nothing real is allocated)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from plait.errors import CaptureError
from plait.graph.diagnose import capture_error, module_stack
from plait.graph.fake import (
    as_input_tuple,
    autocast_to,
    buffer_bytes,
    dtype_name,
    fake_inputs,
    fake_model,
    main_dtype,
    new_fake_mode,
    storage_key,
)
from plait.graph.layers import candidate_layers, order_by_call, structural_owner
from plait.graph.model_graph import LayerInfo, ModelGraph, OpNode, ParamInfo
from plait.graph.trace import LayerStats, LossFn, TraceResult, trace_layers


def capture(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[Any, ...],
    *,
    name: str | None = None,
    loss_fn: LossFn | None = None,
    with_ops: bool = True,
    with_joint: bool = False,
    autocast: str | None = None,
) -> ModelGraph:
    """Capture ``model`` into a ModelGraph: layers, parameters, FLOPs, activation and boundary bytes, ops.

    ``example_inputs`` (real, meta or fake tensors; only shapes and dtypes are read) are the positional
    arguments of ``model``, or the batch given to ``loss_fn(model, batch)`` when ``loss_fn`` is set.
    Without ``loss_fn`` the backward pass differentiates the sum of the model's floating-point outputs.
    ``with_joint`` also traces the joint forward+backward ATen graph (``ModelGraph.joint``, see
    ``capture_joint``). ``autocast`` ("bf16") captures under autocast, as mixed precision runs the model:
    activations and their bytes are then those of the compute dtype. The model is never modified: capture
    runs on a copy whose parameters are fake tensors.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture() needs an nn.Module, got {type(model).__name__}")
    inputs = as_input_tuple(example_inputs)
    graph_name = name or type(model).__name__
    mode = new_fake_mode()
    fmodel = fake_model(model, mode)
    finputs = fake_inputs(inputs, mode)
    candidates = candidate_layers(fmodel)
    with autocast_to(autocast):
        trace = _run_trace(fmodel, finputs, loss_fn, candidates, mode, graph_name)
    order = order_by_call(candidates, trace.call_order)
    layers, params = _layer_view(fmodel, candidates, order, trace)
    ops: tuple[OpNode, ...] = ()
    if with_ops:
        from plait.graph.ops import export_ops

        ops = export_ops(fmodel, finputs, loss_fn, mode, [layer.name for layer in layers], graph_name)
    joint = None
    if with_joint:
        from plait.graph.joint import joint_of_fake

        with autocast_to(autocast):
            joint = joint_of_fake(fmodel, finputs, loss_fn, graph_name, [layer.name for layer in layers])
    first = next(x for x in inputs if isinstance(x, torch.Tensor))
    return ModelGraph(
        name=graph_name,
        dtype=main_dtype(model),
        batch_size=int(first.shape[0]) if first.dim() > 0 else 1,
        input_shapes=tuple(tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)),
        layers=layers,
        params=params,
        ops=ops,
        buffer_bytes=buffer_bytes(model),
        joint=joint,
    )


def _run_trace(
    fmodel: nn.Module,
    finputs: tuple[Any, ...],
    loss_fn: LossFn | None,
    candidates: list[tuple[str, nn.Module]],
    mode: Any,
    graph_name: str,
) -> TraceResult:
    with module_stack(fmodel) as stack, mode:
        try:
            return trace_layers(fmodel, finputs, loss_fn, [m for _, m in candidates])
        except CaptureError:
            raise
        except Exception as exc:
            raise capture_error(graph_name, stack.where(), exc, finputs) from exc


def _owners(
    fmodel: nn.Module, layer_names: list[str], trace: TraceResult, index_of: dict[int, int]
) -> dict[str, int]:
    """Owning layer (final index) of each parameter: the first layer that used it, else its module's layer."""
    owners: dict[str, int] = {}
    first_layer = 0
    for pname, p in fmodel.named_parameters():
        used = trace.first_use.get(storage_key(p), -1)
        if used is None:
            owners[pname] = first_layer
        elif used >= 0:
            owners[pname] = index_of[used]
        else:
            owner = structural_owner(pname, layer_names)
            owners[pname] = index_of[owner] if owner is not None else first_layer
    return owners


def _layer_view(
    fmodel: nn.Module, candidates: list[tuple[str, nn.Module]], order: list[int], trace: TraceResult
) -> tuple[tuple[LayerInfo, ...], tuple[ParamInfo, ...]]:
    index_of = {cand: i for i, cand in enumerate(order)}
    owners = _owners(fmodel, [n for n, _ in candidates], trace, index_of)
    params = tuple(
        ParamInfo(name=n, shape=tuple(p.shape), dtype=dtype_name(p.dtype), layer=owners[n])
        for n, p in fmodel.named_parameters()
    )
    layers = []
    for i, cand in enumerate(order):
        st = _merge(trace.stats[cand], trace.glue) if i == 0 else trace.stats[cand]
        mine = [p for p in params if p.layer == i]
        fqn, module = candidates[cand]
        layers.append(
            LayerInfo(
                index=i,
                name=fqn,
                kind=type(module).__name__,
                fwd_flops=st.fwd_flops,
                bwd_flops=st.bwd_flops,
                num_params=sum(p.numel for p in mine),
                param_bytes=sum(p.nbytes for p in mine),
                activation_bytes=st.activation_bytes,
                output_bytes=st.output_bytes,
                output_shape=st.output_shape,
                fwd_bytes_moved=st.fwd_bytes_moved,
                num_kernels=st.num_kernels,
                bwd_workspace_bytes=st.bwd_workspace_bytes,
                bwd_param_grad_bytes=st.bwd_param_grad_bytes,
            )
        )
    return tuple(layers), params


def _merge(a: LayerStats, glue: LayerStats) -> LayerStats:
    """``a`` plus the glue that ran before the first layer (its boundary stays ``a``'s)."""
    return LayerStats(
        fwd_flops=a.fwd_flops + glue.fwd_flops,
        bwd_flops=a.bwd_flops + glue.bwd_flops,
        activation_bytes=a.activation_bytes + glue.activation_bytes,
        fwd_bytes_moved=a.fwd_bytes_moved + glue.fwd_bytes_moved,
        num_kernels=a.num_kernels + glue.num_kernels,
        output_bytes=a.output_bytes,
        output_shape=a.output_shape,
        bwd_workspace_bytes=max(a.bwd_workspace_bytes, glue.bwd_workspace_bytes),
        bwd_param_grad_bytes=max(a.bwd_param_grad_bytes, glue.bwd_param_grad_bytes),
    )
