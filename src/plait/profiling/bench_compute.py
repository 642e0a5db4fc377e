"""Compute benchmarks one rank runs: GEMMs, a tiny op, small training blocks, copy, elementwise, AdamW."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plait.models.gpt import Block, GPTConfig
from plait.models.mlp import DenseLayer
from plait.profiling.config import ProfileConfig
from plait.profiling.timing import Timer

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32}
# Small enough that their kernels do next to no work: the time is dispatch, autograd and launch.
TINY_GPT = GPTConfig(vocab_size=16, seq_len=8, num_layers=1, num_heads=2, hidden=16)
TINY_MLP_WIDTH, TINY_MLP_DEPTH = 8, 4


def tiny_blocks(device: torch.device | str = "cpu") -> list[tuple[nn.Module, torch.Tensor]]:
    """The small training blocks whose kernel overhead is measured, with an input each."""
    with torch.device(device):
        gpt = nn.Sequential(Block(TINY_GPT))
        mlp = nn.Sequential(*[DenseLayer(TINY_MLP_WIDTH, TINY_MLP_WIDTH) for _ in range(TINY_MLP_DEPTH)])
        return [
            (gpt, torch.randn(1, TINY_GPT.seq_len, TINY_GPT.hidden)),
            (mlp, torch.randn(2, TINY_MLP_WIDTH)),
        ]


def matmul_times(cfg: ProfileConfig, timer: Timer, device: torch.device) -> list[dict[str, Any]]:
    """Median seconds of one square GEMM per (dtype, size)."""
    rows = []
    for dtype in cfg.dtypes:
        torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
        for n in cfg.matmul_sizes:
            a = torch.randn(n, n, device=device, dtype=TORCH_DTYPES[dtype])
            b = torch.randn(n, n, device=device, dtype=TORCH_DTYPES[dtype])
            seconds = timer.per_call(partial(torch.mm, a, b), warmup=cfg.warmup, repeats=cfg.repeats)
            rows.append({"dtype": dtype, "m": n, "k": n, "n": n, "seconds": seconds})
    torch.backends.cuda.matmul.allow_tf32 = False
    return rows


def tiny_op_time(cfg: ProfileConfig, timer: Timer, device: torch.device) -> float:
    """Seconds of one add of two one-element tensors (no autograd)."""
    a = torch.ones(1, device=device)
    b = torch.ones(1, device=device)
    return timer.per_call(lambda: torch.add(a, b), warmup=cfg.warmup, repeats=cfg.repeats)


def block_times(cfg: ProfileConfig, timer: Timer, device: torch.device) -> list[float]:
    """Seconds of forward + backward (of the output's sum) of each tiny block."""
    times = []
    for module, x in tiny_blocks(device):

        def step(module: nn.Module = module, x: torch.Tensor = x) -> None:
            module(x).sum().backward()

        times.append(timer.per_call(step, warmup=cfg.warmup, repeats=cfg.repeats))
    return times


def copy_bandwidth(cfg: ProfileConfig, timer: Timer, device: torch.device) -> float:
    """Bytes/s read + written by a large copy."""
    src = torch.randn(cfg.copy_numel, device=device)
    dst = torch.empty_like(src)
    seconds = timer.per_call(lambda: dst.copy_(src), warmup=cfg.warmup, repeats=cfg.repeats)
    return 2 * src.numel() * src.element_size() / seconds


def elementwise_bandwidth(cfg: ProfileConfig, timer: Timer, device: torch.device) -> float:
    """Bytes/s (inputs + outputs) of GELU, LayerNorm and add together: what non-GEMM kernels of a layer reach."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    width = 1024
    x = torch.randn(cfg.copy_numel // width, width, device=device, dtype=dtype)
    y = torch.randn_like(x)
    ops = [
        (lambda: F.gelu(x), 2),
        (lambda: F.layer_norm(x, (width,)), 2),
        (lambda: torch.add(x, y), 3),
    ]
    total_bytes = sum(tensors * x.numel() * x.element_size() for _, tensors in ops)
    total_s = sum(timer.per_call(fn, warmup=cfg.warmup, repeats=cfg.repeats) for fn, _ in ops)
    return total_bytes / total_s


def adamw_times(cfg: ProfileConfig, timer: Timer, device: torch.device) -> tuple[float, float]:
    """``(per element, per tensor)`` seconds of a default ``torch.optim.AdamW`` step."""
    num_small = 64
    small = [nn.Parameter(torch.randn(16, device=device)) for _ in range(num_small)]
    big = [nn.Parameter(torch.randn(cfg.adamw_numel, device=device))]
    seconds = []
    for params in (small, big):
        for p in params:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(params, lr=1e-3)
        seconds.append(timer.per_call(opt.step, warmup=cfg.warmup, repeats=cfg.repeats))
    per_tensor = seconds[0] / num_small
    per_param = max(seconds[1] - per_tensor, 0.0) / cfg.adamw_numel
    return per_param, per_tensor


def host_link_bandwidths(cfg: ProfileConfig, timer: Timer, device: torch.device) -> dict[str, float]:
    """Bytes/s of pinned host-to-device and device-to-host copies (CUDA only)."""
    if device.type != "cuda":
        return {}
    host = torch.empty(cfg.copy_numel, pin_memory=True)
    dev = torch.empty(cfg.copy_numel, device=device)
    nbytes = host.numel() * host.element_size()
    h2d = timer.per_call(lambda: dev.copy_(host, non_blocking=True), warmup=cfg.warmup, repeats=cfg.repeats)
    d2h = timer.per_call(lambda: host.copy_(dev, non_blocking=True), warmup=cfg.warmup, repeats=cfg.repeats)
    return {"h2d_bandwidth": nbytes / h2d, "d2h_bandwidth": nbytes / d2h}


def compute_results(cfg: ProfileConfig, timer: Timer, device: torch.device) -> dict[str, Any]:
    """Everything one rank measures at one concurrency level."""
    per_param, per_tensor = adamw_times(cfg, timer, device)
    return {
        **host_link_bandwidths(cfg, timer, device),
        "matmul": matmul_times(cfg, timer, device),
        "op_s": tiny_op_time(cfg, timer, device),
        "block_s": block_times(cfg, timer, device),
        "copy_bandwidth": copy_bandwidth(cfg, timer, device),
        "elementwise_bandwidth": elementwise_bandwidth(cfg, timer, device),
        "adamw_param_s": per_param,
        "adamw_tensor_s": per_tensor,
    }
