"""Whether a model can run as pipeline stages of its layer view: its forward must be the chain of those layers.

plait's pipeline runtime runs a stage as its layers one after another, each on the previous one's output, and
applies the user's loss to the last stage's output in place of the model. That is the model's own computation
only when (a) the loss calls the model once, on the batch's first element alone; (b) inside the model the
first layer takes that input, each later layer takes exactly the previous layer's output, each layer runs
once, and nothing else is passed between them; (c) the model returns the last layer's output unchanged.
``chain_problem`` checks all three by running a fake copy of the model (no memory, no compute) with
hooks that compare tensor identities, and names the first rule a model breaks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from plait.graph.fake import fake_inputs, fake_model, new_fake_mode


class _Calls(nn.Module):
    """Stands in for the model inside the loss: records what the loss passes and what the model returns."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any], Any]] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.model(*args, **kwargs)
        self.calls.append((args, kwargs, out))
        return out


def chain_problem(model: nn.Module, example_batch: Sequence[Any], layers: Sequence[str],
                  loss_fn: Callable[..., Any] | None = None) -> str | None:
    """None when ``model`` (with ``loss_fn``) is the chain of ``layers``; else why it is not (see the module docstring)."""
    if not layers:
        return "the model has no layer view to cut into stages"
    mode = new_fake_mode()
    model, example_batch = fake_model(model, mode), fake_inputs(tuple(example_batch), mode)
    try:
        modules = [model.get_submodule(name) for name in layers]
    except AttributeError as exc:
        return f"a layer of the layer view is not a submodule: {exc}"
    seen: list[tuple[tuple[Any, ...], dict[str, Any], Any]] = [None] * len(modules)  # type: ignore[list-item]
    counts = [0] * len(modules)
    handles = [m.register_forward_hook(_recorder(k, seen, counts), with_kwargs=True) for k, m in enumerate(modules)]
    proxy = _Calls(model)
    try:
        with torch.no_grad(), mode:
            if loss_fn is None:
                proxy(example_batch[0])
            else:
                loss_fn(proxy, tuple(example_batch))
    except Exception as exc:  # the model may not run on fake tensors: say so rather than guess
        return f"running the model on fake tensors failed ({type(exc).__name__}: {exc})"
    finally:
        for h in handles:
            h.remove()
    return _judge(proxy.calls, example_batch, layers, seen, counts)


def _recorder(k: int, seen: list[Any], counts: list[int]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        counts[k] += 1
        seen[k] = (args, kwargs, out)

    return hook


def _judge(calls: list[tuple[tuple[Any, ...], dict[str, Any], Any]], batch: Sequence[Any], layers: Sequence[str],
           seen: list[Any], counts: list[int]) -> str | None:
    if len(calls) != 1:
        return f"the loss calls the model {len(calls)} times; a pipeline needs one call per micro-batch"
    args, kwargs, out = calls[0]
    if kwargs or len(args) != 1 or args[0] is not batch[0]:
        return "the loss must call the model on the batch's first element alone (model(batch[0]))"
    for k, name in enumerate(layers):
        if counts[k] != 1:
            return f"layer {name!r} runs {counts[k]} times in one forward; each layer of a pipeline runs once"
        layer_args, layer_kwargs, _ = seen[k]
        previous = batch[0] if k == 0 else seen[k - 1][2]
        if layer_kwargs or len(layer_args) != 1 or layer_args[0] is not previous:
            what = "the model's input" if k == 0 else f"the output of {layers[k - 1]!r}"
            return f"layer {name!r} does not take exactly {what}; a pipeline passes one tensor from layer to layer"
    if out is not seen[-1][2]:
        return f"the model does not return the output of its last layer {layers[-1]!r} unchanged"
    return None
