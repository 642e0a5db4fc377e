"""A plain GPT (pre-LN decoder, fused QKV, causal SDPA, 4h GELU MLP). No parallelism inside."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Sizes of a GPT; ``GPT_CONFIGS`` names the published ones."""

    vocab_size: int = 50304
    seq_len: int = 1024
    num_layers: int = 12
    num_heads: int = 12
    hidden: int = 768
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.hidden % self.num_heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by num_heads ({self.num_heads})")

    @property
    def num_params(self) -> int:
        """Parameter count of the model this config builds."""
        h, v, t, n = self.hidden, self.vocab_size, self.seq_len, self.num_layers
        block = 12 * h * h + 13 * h
        return v * h + t * h + n * block + 2 * h + v * h


# GPT-2 (Radford et al. 2019) and GPT-3 (Brown et al. 2020, Table 2.1) shapes.
GPT_CONFIGS: dict[str, GPTConfig] = {
    "gpt-tiny": GPTConfig(vocab_size=96, seq_len=64, num_layers=2, num_heads=2, hidden=64),
    "gpt-mini": GPTConfig(vocab_size=512, seq_len=128, num_layers=4, num_heads=4, hidden=128),
    # gpt-tiny's blocks, six of them: a layer view of 8 (pipelines of 4 ranks x 2 model chunks)
    "gpt-tiny-deep": GPTConfig(vocab_size=96, seq_len=64, num_layers=6, num_heads=2, hidden=64),
    "gpt2-small": GPTConfig(num_layers=12, num_heads=12, hidden=768),
    "gpt2-medium": GPTConfig(num_layers=24, num_heads=16, hidden=1024),
    "gpt2-large": GPTConfig(num_layers=36, num_heads=20, hidden=1280),
    "gpt2-xl": GPTConfig(num_layers=48, num_heads=25, hidden=1600),
    "gpt3-1.3b": GPTConfig(seq_len=2048, num_layers=24, num_heads=16, hidden=2048),
    "gpt3-2.7b": GPTConfig(seq_len=2048, num_layers=32, num_heads=32, hidden=2560),
    "gpt3-6.7b": GPTConfig(seq_len=2048, num_layers=32, num_heads=32, hidden=4096),
    "gpt3-13b": GPTConfig(seq_len=2048, num_layers=40, num_heads=40, hidden=5120),
    # the largest GPT of Alpa's evaluation (OSDI'22); its benchmark suite uses 1,024 tokens, here 2,048
    "gpt-39b": GPTConfig(seq_len=2048, num_layers=48, num_heads=64, hidden=8192),
    "gpt3-70b": GPTConfig(seq_len=2048, num_layers=80, num_heads=64, hidden=8192),
    "gpt3-175b": GPTConfig(seq_len=2048, num_layers=96, num_heads=96, hidden=12288),
}


class Embedding(nn.Module):
    """Token plus learned position embedding."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.pos = nn.Embedding(cfg.seq_len, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.drop(self.tok(idx) + self.pos(positions))


class Attention(nn.Module):
    """Causal multi-head self-attention with one fused, head-major QKV projection.

    The fused projection's output features are laid out head by head (each head's query, key and value
    next to each other), so a split of the projection over its output features keeps whole heads
    together, as Megatron-LM lays it out.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = attention_heads(self.qkv, self.num_heads, x)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(x.shape))


def attention_heads(qkv: nn.Module, num_heads: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values of ``x`` (batch, tokens, hidden) through the fused ``qkv`` projection, each
    (batch, heads, tokens, head size)."""
    b, t, h = x.shape
    head = h // num_heads
    fused = qkv(x).view(b, t, num_heads, 3 * head)
    q, k, v = (z.transpose(1, 2) for z in fused.split(head, dim=3))
    return q, k, v


class MLP(nn.Module):
    """Two linear layers with a 4x hidden expansion and GELU."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden, 4 * cfg.hidden)
        self.fc2 = nn.Linear(4 * cfg.hidden, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """Final LayerNorm and the vocabulary projection."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


class GPT(nn.Module):
    """Decoder-only transformer: ``embed``, ``blocks.0..n-1``, ``head``; maps token ids to logits."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if not any(p.is_meta for p in self.parameters()):
            self.apply(_init_weights)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Next-token cross-entropy of ``model`` on ``(tokens, targets)``."""
    tokens, targets = batch
    logits = model(tokens)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def token_batch(
    vocab_size: int, seq_len: int, batch_size: int, *, device: str | torch.device = "cpu", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(tokens, targets)`` of ``seq_len`` tokens, targets shifted by one; empty on the meta device."""
    if str(device) == "meta":
        shape = (batch_size, seq_len)
        return torch.empty(shape, dtype=torch.long, device="meta"), torch.empty(shape, dtype=torch.long, device="meta")
    data = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=generator)
    return data[:, :-1].to(device), data[:, 1:].to(device)


def lm_batch(cfg: GPTConfig, batch_size: int, *, device: str | torch.device = "cpu", generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random ``(tokens, targets)`` of the config's sequence length."""
    return token_batch(cfg.vocab_size, cfg.seq_len, batch_size, device=device, generator=generator)
