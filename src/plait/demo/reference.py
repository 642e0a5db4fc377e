"""The single-process reference: plain PyTorch, the same model, batches and AdamW, no plait runtime."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from plait.demo.job import DemoJob, lm_loss


def train_reference(job: DemoJob, *, on_step: Callable[[int], None] | None = None) -> tuple[list[float], dict[str, torch.Tensor], float]:
    """Losses per step, final parameters and mean step time of one process on the full global batch."""
    torch.manual_seed(job.seed)
    model: nn.Module = job.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.lr, weight_decay=job.weight_decay)
    data = job.data()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(job.steps):
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(model, data(step))
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step)
    elapsed = (time.perf_counter() - t0) / max(1, job.steps)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, elapsed
