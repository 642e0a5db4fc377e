"""Pinned activations of a tensor-parallel model: hooks give activations (and their gradients) placements.

``pin_activations`` hooks the modules the plan names. A pinned input or output is redistributed to its
placements in forward, and its gradient to the same placements in backward, as Megatron-LM's conjugate
operators do: the pending sums of the gradients that meet at a pinned module input are reduced there,
once, instead of spreading into the gradients of the replicated weights upstream.

The root module's hooks make the model look plain from outside. Its plain tensor inputs become
replicated DTensors. During its forward, a ``TorchFunctionMode`` turns every plain tensor that meets a
DTensor in a torch call (position ids, rotary tables, masks made inside the model) into a replicated
DTensor before autograd saves it, so backward meets DTensors only and needs no context; DTensor's
implicit replication is also on during forward, for plain tensors made inside composite C++ ops. Its
outputs come out as plain full tensors.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, NamedTuple, cast

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.hooks import RemovableHandle

from plait.dtensor_rules import ensure_rules
from plait.errors import PlaitError
from plait.plan.ir import Port
from plait.plan.placement import Placement


class Pin(NamedTuple):
    """An activation the plan pins: input or output ``position`` of module ``module`` has ``placements``.

    ``position`` counts positional arguments (an argument passed by keyword is found through the name of
    ``forward``'s parameter at that position) or outputs of a tuple; a name picks a keyword argument.
    A plan's ``ActivationPlan`` gives one: its ``index`` and its placements on the model axes only.
    """

    module: str
    port: Port
    position: int | str
    placements: Sequence[Placement]


def to_placements(value: Any, mesh: DeviceMesh, placements: Sequence[Placement]) -> Any:
    """``value`` as a DTensor on ``mesh`` with ``placements``, its gradient too (plain tensors: replicated).

    Forward redistributes (no-op when equal). Backward gives the gradient the pinned placements as well
    (a pinned ``Partial`` activation gets a replicated gradient), so that, as in Megatron-LM, the pending
    sums of the gradients that meet at a pinned module input are reduced there, once, and do not spread
    into the gradients of replicated weights upstream.
    """
    if not isinstance(value, torch.Tensor):
        raise PlaitError(f"a pinned activation must be a tensor, got {type(value).__name__}")
    target = tuple(p.to_dtensor() for p in placements)
    dt = (
        value
        if isinstance(value, DTensor)
        else DTensor.from_local(value, mesh, [Replicate()] * mesh.ndim, run_check=False)
    )
    if not _already(tuple(dt.placements), target):
        dt = dt.redistribute(mesh, target)
    if not dt.requires_grad:
        return dt
    return _PinGrad.apply(dt, tuple(Replicate() if p.is_partial() else p for p in target))


def _already(current: tuple[Any, ...], target: tuple[Any, ...]) -> bool:
    """True when ``current`` is ``target`` where a pending sum of any kind (an embedding's masked one) counts as Partial."""
    return all(c == t or (c.is_partial() and t.is_partial()) for c, t in zip(current, target, strict=True))


class _PinGrad(torch.autograd.Function):
    """Identity forward; backward redistributes the gradient to the given placements."""

    @staticmethod
    def forward(ctx: Any, value: DTensor, placements: tuple[Any, ...]) -> DTensor:  # noqa: D102
        ctx.placements = placements
        return cast(DTensor, value.view_as(value))

    @staticmethod
    def backward(ctx: Any, grad: Any) -> tuple[Any, None]:  # noqa: D102
        if isinstance(grad, DTensor) and tuple(grad.placements) != ctx.placements:
            grad = grad.redistribute(grad.device_mesh, ctx.placements)
        return grad, None


def _as_replicate(value: Any, mesh: DeviceMesh) -> Any:
    if isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
        return DTensor.from_local(value, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return value


class _ToPlain(torch.autograd.Function):
    """A replicated DTensor as a plain tensor sharing its memory (not a view: FSDP2 warns of view outputs)."""

    @staticmethod
    def forward(ctx: Any, value: DTensor) -> torch.Tensor:  # noqa: D102
        ctx.mesh, ctx.placements = value.device_mesh, value.placements
        return (
            value._local_tensor.detach()
        )  # shares the version counter, so autograd still sees in-place changes

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> DTensor:  # noqa: D102
        return DTensor.from_local(grad, ctx.mesh, ctx.placements, run_check=False)


def _as_plain(value: Any) -> Any:
    """A DTensor's full value as a plain tensor (gathered or summed over the mesh); anything else as is."""
    if not isinstance(value, DTensor):
        return value
    full = value.redistribute(value.device_mesh, [Replicate()] * value.device_mesh.ndim, async_op=False)
    return _ToPlain.apply(full)


def pin_activations(
    model: nn.Module,
    mesh: DeviceMesh,
    pins: Sequence[Pin | tuple[str, Port, int | str, Sequence[Placement | str]]],
) -> list[RemovableHandle]:
    """Hook the pinned activations to their placements (``Placement`` or text); the handles remove the hooks.

    The root module also gets hooks that make its inputs and outputs plain (see the module's docstring).
    Call it once per model, after ``distribute_parameters`` and before data parallelism is applied.
    """
    ensure_rules()
    by_module: dict[str, list[Pin]] = {}
    for raw in pins:
        module_fqn, port, position, placements = raw
        pin = Pin(
            module_fqn,
            port,
            position,
            tuple(p if isinstance(p, Placement) else Placement.parse(p) for p in placements),
        )
        if pin.port not in ("input", "output"):
            raise PlaitError(f"pin on {pin.module!r}: port must be 'input' or 'output', not {pin.port!r}")
        if len(pin.placements) != mesh.ndim:
            raise PlaitError(
                f"pin {pin.port} {pin.position} of {pin.module!r} has {len(pin.placements)} placements "
                f"but the mesh has {mesh.ndim} axes"
            )
        by_module.setdefault(pin.module, []).append(pin)
    handles: list[RemovableHandle] = []
    for fqn, module_pins in by_module.items():
        try:
            module = model.get_submodule(fqn)
        except AttributeError:
            raise PlaitError(
                f"the plan pins an activation of module {fqn!r}, which the model does not have; "
                "re-run `plait plan`"
            ) from None
        inputs = [p for p in module_pins if p.port == "input"]
        outputs = [p for p in module_pins if p.port == "output"]
        if inputs:
            handles.append(
                module.register_forward_pre_hook(_input_hook(module, mesh, inputs), with_kwargs=True)
            )
        if outputs:
            handles.append(module.register_forward_hook(_output_hook(mesh, outputs)))
    handles += _root_hooks(model, mesh)
    return handles


def _input_hook(
    module: nn.Module, mesh: DeviceMesh, pins: list[Pin]
) -> Callable[..., tuple[tuple[Any, ...], dict[str, Any]]]:
    names = _positional_names(module)

    def hook(
        _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        new_args, new_kwargs = list(args), dict(kwargs)
        for pin in pins:
            if isinstance(pin.position, int) and pin.position < len(args):
                new_args[pin.position] = to_placements(args[pin.position], mesh, pin.placements)
                continue
            key = (
                pin.position
                if isinstance(pin.position, str)
                else (names[pin.position] if pin.position < len(names) else None)
            )
            if key is None or kwargs.get(key) is None:
                raise PlaitError(
                    f"module {pin.module!r} got no input {pin.position!r} to pin; "
                    "the plan was made for another model"
                )
            new_kwargs[key] = to_placements(kwargs[key], mesh, pin.placements)
        return tuple(new_args), new_kwargs

    return hook


def _positional_names(module: nn.Module) -> list[str]:
    """The names of ``module.forward``'s positional parameters, in order."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    try:
        return [p.name for p in inspect.signature(module.forward).parameters.values() if p.kind in kinds]
    except (TypeError, ValueError):
        return []


def _output_hook(mesh: DeviceMesh, pins: list[Pin]) -> Callable[[nn.Module, Any, Any], Any]:
    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            for pin in pins:
                if pin.position != 0:
                    raise PlaitError(
                        f"module {pin.module!r} returns one tensor; it has no output {pin.position!r}"
                    )
                output = to_placements(output, mesh, pin.placements)
            return output
        if not isinstance(output, (tuple, list)):
            raise PlaitError(
                f"module {pins[0].module!r} returns a {type(output).__name__}; pin outputs of modules "
                "that return a tensor or a tuple"
            )
        items = list(output)
        for pin in pins:
            if not isinstance(pin.position, int) or not 0 <= pin.position < len(items):
                raise PlaitError(
                    f"module {pin.module!r} has no output {pin.position!r} (it returns {len(items)})"
                )
            items[pin.position] = to_placements(items[pin.position], mesh, pin.placements)
        return type(output)(items) if isinstance(output, list) else tuple(items)

    return hook


class _ReplicatePlain(TorchFunctionMode):
    """A plain tensor meeting a DTensor in a torch call becomes a replicated DTensor."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        flat, spec = tree_flatten((args, kwargs))
        mesh = next((t.device_mesh for t in flat if isinstance(t, DTensor)), None)
        if mesh is not None and any(_is_plain(t) for t in flat):
            flat = [
                DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False) if _is_plain(t) else t
                for t in flat
            ]
            args, kwargs = tree_unflatten(flat, spec)
        return func(*args, **kwargs)


def _is_plain(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.ndim > 0


def _root_hooks(model: nn.Module, mesh: DeviceMesh) -> list[RemovableHandle]:
    """Plain inputs become replicated DTensors, so do plain tensors made inside; outputs come out plain."""
    previous: list[bool] = []
    modes: list[_ReplicatePlain] = []

    def enter(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        previous.append(_implicit_replication())
        _set_implicit_replication(True)
        modes.append(_ReplicatePlain())
        modes[-1].__enter__()
        return tree_map(lambda v: _as_replicate(v, mesh), (args, kwargs))

    def leave(_module: nn.Module, _args: Any, _kwargs: Any, output: Any) -> Any:
        try:
            if modes:
                modes.pop().__exit__(None, None, None)
            return tree_map(_as_plain, output)
        finally:
            _set_implicit_replication(previous.pop() if previous else False)

    return [
        model.register_forward_pre_hook(enter, with_kwargs=True, prepend=True),
        model.register_forward_hook(leave, with_kwargs=True, always_call=True),
    ]


def _implicit_replication() -> bool:
    return bool(torch._C._get_dtensor_allow_implicit_replication())


def _set_implicit_replication(on: bool) -> None:
    torch._C._set_dtensor_allow_implicit_replication(on)


@contextmanager
def replicate_plain_tensors() -> Iterator[None]:
    """DTensor's implicit replication for the block, restoring the previous setting on exit (it nests).

    A fallback, not needed by the models tested: wrap forward *and* backward in it if a backward formula
    meets a plain tensor that a composite C++ op made and saved in forward (the root hooks cannot reach
    backward: autograd runs it with the thread-local state of the moment ``backward()`` is called).
    """
    previous = _implicit_replication()
    _set_implicit_replication(True)
    try:
        yield
    finally:
        _set_implicit_replication(previous)


def recompute_context() -> AbstractContextManager[None]:
    """The context a layer recomputed in backward needs: the root's forward context (plain tensors made inside
    become replicated DTensors) when its forward ran in one, else nothing. Called at forward time."""
    if any(isinstance(m, _ReplicatePlain) for m in _get_current_function_mode_stack()):
        return _replicating()
    return nullcontext()


@contextmanager
def _replicating() -> Iterator[None]:
    with replicate_plain_tensors(), _ReplicatePlain():
        yield
