"""Boundary markers: identity ops that mark, in a traced joint graph, where a module's activations may be pinned.

While the joint graph is traced, hooks wrap every tensor entering or leaving a marked module in
``plait::boundary(x, key)``; its gradient passes ``plait::boundary_grad(g, key)``. Both are identities.
In the graph they are the places where the runtime may redistribute an activation (a pin) and, in
backward, its gradient; the sharding planner chooses a placement for each and the runtime applies it
with module hooks. ``key`` indexes the ``Boundary`` table of the graph.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

Port = Literal["input", "output"]


@dataclass(frozen=True)
class Boundary:
    """Input or output ``index`` (counted over the tensors among the module's arguments or outputs) of ``module``."""

    module: str
    port: Port
    index: int


@torch.library.custom_op("plait::boundary", mutates_args=())
def boundary(x: torch.Tensor, key: int) -> torch.Tensor:
    """Identity marking a module boundary in a traced graph (never run outside tracing)."""
    return x.clone()


@boundary.register_fake
def _boundary_fake(x: torch.Tensor, key: int) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("plait::boundary_grad", mutates_args=())
def boundary_grad(g: torch.Tensor, key: int) -> torch.Tensor:
    """The gradient of a boundary marker: identity, marking where the gradient crosses the boundary."""
    return g.clone()


@boundary_grad.register_fake
def _boundary_grad_fake(g: torch.Tensor, key: int) -> torch.Tensor:
    return torch.empty_like(g)


def _boundary_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
    return boundary_grad(grad, ctx.key), None


def _boundary_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.key = inputs[1]


boundary.register_autograd(_boundary_backward, setup_context=_boundary_setup)

BOUNDARY_OPS = (torch.ops.plait.boundary.default, torch.ops.plait.boundary_grad.default)


def marked_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose activations may be pinned: those holding parameters of their own, and the root."""
    found = [(name, m) for name, m in model.named_modules() if name and any(True for _ in m.parameters(recurse=False))]
    return [("", model), *found]


class _Marker:
    """Wraps tensors in boundary markers and records the table of boundaries."""

    def __init__(self) -> None:
        self.table: list[Boundary] = []

    def wrap(self, value: Any, module: str, port: Port) -> Any:
        leaves, spec = tree_flatten(value)
        out, index = [], 0
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
                self.table.append(Boundary(module=module, port=port, index=index))
                leaf = boundary(leaf, len(self.table) - 1)
            if isinstance(leaf, torch.Tensor):
                index += 1
            out.append(leaf)
        return tree_unflatten(out, spec)


@contextmanager
def boundary_markers(model: nn.Module) -> Iterator[list[Boundary]]:
    """Hooks that mark the inputs and outputs of ``marked_modules(model)`` while a trace runs; yields the
    table of boundaries (filled as the model runs). The hooks are removed on exit."""
    marker = _Marker()
    handles = []
    for name, module in marked_modules(model):
        def pre(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name) -> Any:
            return marker.wrap((args, kwargs), name, "input")

        def post(m: nn.Module, args: Any, output: Any, name: str = name) -> Any:
            return marker.wrap(output, name, "output")

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    try:
        yield marker.table
    finally:
        for h in handles:
            h.remove()
