"""Turn a failure during capture into a CaptureError that names the module, the cause and a fix."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch import nn
from torch._subclasses import fake_tensor

from plait.errors import CaptureError

_VALUE_HINT = (
    "capture runs on fake tensors, which have shapes but no values, so forward must not branch on or read "
    "tensor values (.item(), .tolist(), .numpy(), `if tensor:`, a Python loop over tensor values). "
    "Use tensor ops instead (torch.where, masking, torch.cond) or move that logic out of forward."
)
_SHAPE_HINT = (
    "check example_inputs: their shapes and dtypes must be what forward expects (they are the positional "
    "arguments of model(...), or the batch given to loss_fn(model, batch) when loss_fn is set)."
)
_KERNEL_HINT = (
    "an operator has no fake (meta) implementation, so its output shape cannot be inferred without running "
    "it; register one with torch.library.register_fake (or @torch.library.custom_op(...).register_fake)."
)
_CALL_HINT = (
    "example_inputs must match forward's positional parameters; if the model needs a loss or extra arguments, "
    "pass loss_fn=lambda model, batch: ... that calls it and returns a scalar loss."
)


class ModuleStack:
    """The modules whose forward is running, innermost last (kept when an exception escapes)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def enter(self, fqn: str, *_: Any) -> None:
        """Forward pre-hook: ``fqn`` starts."""
        self.names.append(fqn)

    def leave(self, *_: Any) -> None:
        """Forward hook: the innermost module returned."""
        if self.names:
            self.names.pop()

    def where(self) -> str:
        """Where the failure happened, as a phrase."""
        if self.names:
            return f"module {self.names[-1]!r}" if self.names[-1] else "the root module's forward"
        return "code outside every submodule (the root's forward, the loss or backward)"


@contextlib.contextmanager
def module_stack(model: nn.Module) -> Iterator[ModuleStack]:
    """Track the running module FQNs of ``model`` (hooks removed on exit) and silence fake-tensor logs."""
    stack = ModuleStack()
    handles = []
    for fqn, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(partial(stack.enter, fqn)))
        handles.append(module.register_forward_hook(stack.leave))
    logger = logging.getLogger(fake_tensor.__name__)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield stack
    finally:
        logger.setLevel(level)
        for h in handles:
            h.remove()


def _hint(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, fake_tensor.DataDependentOutputException | fake_tensor.DynamicOutputShapeException):
        return _VALUE_HINT
    if (
        "data-dependent" in text
        or "not supported for tensor subclasses" in text
        or "Cannot access data" in text
    ):
        return _VALUE_HINT
    if isinstance(exc, fake_tensor.UnsupportedOperatorException | NotImplementedError) or "fake impl" in text:
        return _KERNEL_HINT
    if isinstance(exc, TypeError) and ("argument" in text or "positional" in text):
        return _CALL_HINT
    if isinstance(exc, RuntimeError | IndexError | ValueError):
        return _SHAPE_HINT
    return "run the model once on small real inputs to see whether it works outside capture."


def _describe_inputs(inputs: tuple[Any, ...]) -> str:
    parts = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            parts.append(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}")
        else:
            parts.append(type(x).__name__)
    return ", ".join(parts)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def capture_error(graph_name: str, where: str, exc: BaseException, inputs: tuple[Any, ...]) -> CaptureError:
    """The CaptureError for ``exc`` raised in ``where`` while capturing ``graph_name``."""
    reason = first_line(exc)
    if isinstance(exc, fake_tensor.DataDependentOutputException):
        reason = f"it reads a tensor value ({reason}: .item(), .tolist(), bool(tensor), ...)"
    elif isinstance(exc, fake_tensor.UnsupportedOperatorException):
        reason = f"operator {reason} has no fake (meta) kernel"
    elif isinstance(exc, fake_tensor.DynamicOutputShapeException):
        reason = f"an output shape depends on tensor values ({reason}, e.g. boolean-mask indexing)"
    return CaptureError(
        f"cannot capture {graph_name}: {where} failed with {type(exc).__name__}: {reason} "
        f"(example inputs: {_describe_inputs(inputs)}). Hint: {_hint(exc)}"
    )
