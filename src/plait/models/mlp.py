"""A plain multi-layer perceptron: ``layers.0..n-1`` of Linear + GELU, then a Linear ``out``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class MLPConfig:
    """Widths of an MLP."""

    in_dim: int = 64
    hidden: int = 256
    num_layers: int = 4
    out_dim: int = 16


MLP_CONFIGS: dict[str, MLPConfig] = {
    "mlp-tiny": MLPConfig(in_dim=16, hidden=32, num_layers=3, out_dim=8),
    "mlp-small": MLPConfig(in_dim=256, hidden=1024, num_layers=4, out_dim=64),
    "mlp-large": MLPConfig(in_dim=1024, hidden=8192, num_layers=8, out_dim=1024),
}


class DenseLayer(nn.Module):
    """Linear followed by GELU."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc(x))


class MLP(nn.Module):
    """Stacked dense layers and an output projection."""

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        dims = [cfg.in_dim] + [cfg.hidden] * cfg.num_layers
        self.layers = nn.ModuleList(DenseLayer(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.out = nn.Linear(cfg.hidden, cfg.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


def mse_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean squared error of ``model`` on ``(inputs, targets)``."""
    inputs, targets = batch
    return F.mse_loss(model(inputs), targets)


def regression_batch(cfg: MLPConfig, batch_size: int, *, device: str | torch.device = "cpu", generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random ``(inputs, targets)``."""
    if str(device) == "meta":
        return torch.empty(batch_size, cfg.in_dim, device="meta"), torch.empty(batch_size, cfg.out_dim, device="meta")
    x = torch.randn(batch_size, cfg.in_dim, generator=generator)
    y = torch.randn(batch_size, cfg.out_dim, generator=generator)
    return x.to(device), y.to(device)
