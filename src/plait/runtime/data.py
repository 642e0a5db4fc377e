"""Split the global batch of a step into this rank's micro-batches, as the plan's batch spec says."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from plait.errors import PlaitError
from plait.plan.ir import BatchSpec

Batch = tuple[torch.Tensor, ...]
# A data source: step -> the global batch of that step (the same on every rank, so any world size agrees).
DataSource = Callable[[int], Sequence[torch.Tensor]]


def local_micro_batches(global_batch: Sequence[torch.Tensor], spec: BatchSpec, *, dp_rank: int) -> list[Batch]:
    """This rank's ``num_micro`` micro-batches: rows [dp_rank * per_rank, (dp_rank + 1) * per_rank) in order.

    ``spec`` must split over the data-parallel ranks (``check_plan`` checks it once, before the first step).
    """
    per_rank = spec.micro_size * spec.num_micro
    tensors = tuple(global_batch)
    for t in tensors:
        if t.shape[0] != spec.global_size:
            raise PlaitError(
                f"the data source gave a batch with leading dimension {t.shape[0]}, but the plan's global batch is "
                f"{spec.global_size}; make the data source return the whole global batch of each step"
            )
    start = dp_rank * per_rank
    return [
        tuple(t[start + j * spec.micro_size : start + (j + 1) * spec.micro_size] for t in tensors) for j in range(spec.num_micro)
    ]


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor of a batch to ``device``."""
    return tuple(t.to(device, non_blocking=True) for t in batch)
