"""Sufficient-factor broadcasting (Poseidon, ATC'17) for ``nn.Linear`` layers.

The weight gradient of a Linear layer y = x W^T + b over a batch of K rows is dW = dY^T X (M x N from the
K x M output gradients and the K x N inputs), and db = sum of the rows of dY. Instead of averaging the M x N
matrix, each worker sends its factors X_k and dY_k (K(M + N) numbers) to every other worker, and every worker
rebuilds the same full gradient ``mean_k dY_k^T X_k`` = ``(1/n) dY_all^T X_all``. A worker moves
2K(P-1)(M+N) numbers per step (sent plus received, P workers), against 2MN through a parameter server; SFB wins
when the per-worker batch K is small next to M x N.

Factors are captured with a forward hook (the input) and a hook on the output tensor (its gradient); rows of
every forward since the last ``finish()`` are kept, so gradient accumulation and a layer used twice in one
forward are covered. Every worker must see the same number of rows (equal data-parallel micro-batches), and
the layer must not be recomputed (activation checkpointing would capture its input twice).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from plait.errors import PlaitError
from plait.runtime.sync.counter import ByteCounter
from plait.runtime.sync.p2p import all_gather_flat, private_group


@dataclass
class SFBLayer:
    """One Linear layer synchronised by SFB: its name, module, whether SFB also rebuilds its bias, its captures."""

    name: str
    module: nn.Linear
    with_bias: bool
    inputs: list[torch.Tensor] = field(default_factory=list, repr=False)
    grads: list[torch.Tensor] = field(default_factory=list, repr=False)

    @property
    def param_names(self) -> tuple[str, ...]:
        """The parameters SFB synchronises for this layer."""
        prefix = f"{self.name}." if self.name else ""
        return (f"{prefix}weight", f"{prefix}bias") if self.with_bias else (f"{prefix}weight",)


class SFBSync:
    """Rebuilds the full weight (and bias) gradients of Linear layers from every worker's sufficient factors."""

    kind = "sfb"
    updates_parameters = False

    def __init__(self, layers: Sequence[tuple[str, nn.Linear, bool]], *, group: dist.ProcessGroup | None = None,
                 name: str = "sfb") -> None:
        self.name = name
        self.group = private_group(group)
        self.size = self.group.size()
        self.counter = ByteCounter()
        self.step_index = 0
        self.layers: list[SFBLayer] = []
        self._handles: list[RemovableHandle] = []
        for layer_name, module, with_bias in layers:
            if not isinstance(module, nn.Linear):
                raise PlaitError(f"SFB synchronises nn.Linear layers; {layer_name!r} is a {type(module).__name__}")
            if with_bias and module.bias is None:
                raise PlaitError(f"SFB was asked to rebuild the bias of {layer_name!r}, which has none")
            layer = SFBLayer(layer_name, module, with_bias)
            self.layers.append(layer)
            self._handles.append(module.register_forward_hook(self._capture(layer)))

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of the parameters this synchronizer rebuilds."""
        return tuple(n for layer in self.layers for n in layer.param_names)

    def finish(self) -> None:
        """Exchange the captured factors with every peer and write the rebuilt mean gradients into ``.grad``."""
        try:
            factors = [self._factors(layer) for layer in self.layers]
            mine = torch.cat([t.reshape(-1) for x, dy in factors for t in (x, dy)])
            everyone = all_gather_flat(mine, self.group, self.counter, self.step_index)
            for layer, (x_all, dy_all) in zip(self.layers, self._unpack(everyone), strict=True):
                weight = layer.module.weight
                weight.grad = (dy_all.t() @ x_all).div_(self.size).to(weight.dtype)
                if layer.with_bias:
                    assert layer.module.bias is not None
                    layer.module.bias.grad = dy_all.sum(0).div_(self.size).to(layer.module.bias.dtype)
        finally:
            for layer in self.layers:
                layer.inputs.clear()
                layer.grads.clear()
            self.step_index += 1

    def close(self) -> None:
        """Remove the hooks (the private group lives until teardown)."""
        for handle in self._handles:
            handle.remove()

    def _capture(self, layer: SFBLayer) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            layer.inputs.append(inputs[0].detach().reshape(-1, layer.module.in_features))
            output.register_hook(lambda g: layer.grads.append(g.detach().reshape(-1, layer.module.out_features)))

        return hook

    def _factors(self, layer: SFBLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """This worker's rows since the last step: inputs X (K x N) and output gradients dY (K x M)."""
        if len(layer.inputs) != len(layer.grads):
            raise PlaitError(f"SFB layer {layer.name!r} saw {len(layer.inputs)} forwards but {len(layer.grads)} "
                             "output gradients; SFB layers must not be recomputed (activation checkpointing)")
        if not layer.inputs:
            raise PlaitError(f"SFB layer {layer.name!r} ran no forward with gradients since the last step")
        return torch.cat(layer.inputs), torch.cat(layer.grads)

    def _unpack(self, everyone: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, every worker's X and dY stacked in group order: (X_all, dY_all)."""
        out = []
        offset = 0
        for layer in self.layers:
            rows = sum(x.shape[0] for x in layer.inputs)
            n_in, n_out = layer.module.in_features, layer.module.out_features
            xs, dys = [], []
            for flat in everyone:
                xs.append(flat[offset : offset + rows * n_in].view(rows, n_in))
                dys.append(flat[offset + rows * n_in : offset + rows * (n_in + n_out)].view(rows, n_out))
            offset += rows * (n_in + n_out)
            out.append((torch.cat(xs), torch.cat(dys)))
        return out
