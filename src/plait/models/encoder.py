"""A stack of post-LN transformer layers on hidden states (as in BERT), with a regression loss.

No embeddings and no output head: the input is a batch of hidden states ``(batch, seq, hidden)`` and the
loss is the mean squared error against a target of the same shape. Alpa's intra-operator tests use
such a stack; its attention and MLP are plait's GPT ones (fused head-major QKV, 4x GELU MLP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from plait.models.gpt import MLP, Attention, GPTConfig


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """Sizes of a post-LN layer stack."""

    hidden: int = 128
    num_heads: int = 8
    num_layers: int = 2
    seq_len: int = 8

    def gpt_config(self) -> GPTConfig:
        """The GPT sizes its attention and MLP are built from."""
        return GPTConfig(vocab_size=1, seq_len=self.seq_len, num_layers=self.num_layers, num_heads=self.num_heads, hidden=self.hidden)


ENCODER_CONFIGS: dict[str, EncoderConfig] = {
    "transformer-tiny": EncoderConfig(),
}


class EncoderLayer(nn.Module):
    """Post-LN layer: ``x = ln1(x + attn(x)); x = ln2(x + mlp(x))``."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        gcfg = cfg.gpt_config()
        self.attn = Attention(gcfg)
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.mlp = MLP(gcfg)
        self.ln2 = nn.LayerNorm(cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.mlp(x))


class Encoder(nn.Module):
    """``layers.0..n-1``: hidden states in, hidden states out."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def encoder_batch(
    cfg: EncoderConfig, batch_size: int, *, device: str | torch.device = "cpu", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(hidden states, targets)`` of shape ``(batch, seq, hidden)``."""
    shape = (batch_size, cfg.seq_len, cfg.hidden)
    if str(device) == "meta":
        return torch.empty(shape, device="meta"), torch.empty(shape, device="meta")
    x = torch.randn(shape, generator=generator)
    y = torch.randn(shape, generator=generator)
    return x.to(device), y.to(device)
