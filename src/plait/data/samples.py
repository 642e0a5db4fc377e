"""Indexed samples read in a seeded epoch order, by batches of any size: the data of adaptive and elastic runs.

A fixed-batch run can take its data as ``step -> global batch``. A run whose batch size changes (adaptive
batch) or whose world size changes (elastic resize) cannot: the step number no longer says which samples
come next. ``SampleStream`` does: it walks a seeded permutation of the dataset per epoch, hands out the
next ``count`` samples whatever ``count`` is, and its whole state is one integer, the number of samples
consumed. A checkpoint that keeps it resumes on the very next sample, so no sample of an epoch is skipped
or repeated across batch changes, restarts and resizes. Every rank holds the same stream and takes the
same global batch; the plan's batch spec gives each rank its rows.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from plait.errors import PlaitError


@runtime_checkable
class Samples(Protocol):
    """A map-style dataset read by batches: ``len(samples)`` samples, ``samples.take(indices)`` stacks them."""

    def __len__(self) -> int: ...

    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The samples at ``indices`` (a 1-D int64 tensor), stacked along a new leading dimension."""
        ...


class TensorSamples:
    """Samples stored as tensors whose leading dimension indexes the sample (inputs, targets, ...)."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        if not tensors:
            raise PlaitError("TensorSamples needs at least one tensor (for example inputs and targets)")
        sizes = {t.shape[0] for t in tensors}
        if len(sizes) != 1:
            raise PlaitError(f"TensorSamples' tensors disagree on the number of samples: leading sizes {sorted(sizes)}")
        self.tensors = tensors

    def __len__(self) -> int:
        return int(self.tensors[0].shape[0])

    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rows ``indices`` of every tensor."""
        return tuple(t[indices] for t in self.tensors)


def epoch_order(num_samples: int, epoch: int, *, seed: int, shuffle: bool = True) -> torch.Tensor:
    """The order of the samples in ``epoch``: a permutation seeded by (seed, epoch), or 0..n-1 unshuffled."""
    if not shuffle:
        return torch.arange(num_samples)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=gen)


class SampleStream:
    """The samples of every epoch in a seeded order, handed out by batches of any size (see module docstring)."""

    def __init__(self, samples: Samples, *, seed: int = 0, shuffle: bool = True, drop_last: bool = False) -> None:
        if len(samples) < 1:
            raise PlaitError("the dataset of a SampleStream is empty; give it at least one sample")
        self.samples, self.seed, self.shuffle, self.drop_last = samples, seed, shuffle, drop_last
        self.position = 0  # samples consumed since the start of training, over all epochs
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its permutation), cached

    @property
    def num_samples(self) -> int:
        """Samples in one epoch."""
        return len(self.samples)

    @property
    def epoch(self) -> int:
        """The epoch the next sample belongs to (0-based)."""
        return self.position // self.num_samples

    def _order_of(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.num_samples, epoch, seed=self.seed, shuffle=self.shuffle))
        return self._order[1]

    def next_indices(self, count: int) -> torch.Tensor:
        """The indices of the next ``count`` samples (continuing into the next epoch when this one runs out)."""
        if count < 1:
            raise PlaitError(f"a batch needs at least one sample, not {count}")
        if self.drop_last and self.position % self.num_samples + count > self.num_samples:
            self.position = (self.epoch + 1) * self.num_samples  # the epoch's rest is too short: start the next one
        parts: list[torch.Tensor] = []
        left = count
        while left:
            offset = self.position % self.num_samples
            part = self._order_of(self.epoch)[offset : offset + left]
            parts.append(part)
            self.position += part.numel()
            left -= part.numel()
        return torch.cat(parts)

    def next_batch(self, count: int) -> tuple[torch.Tensor, ...]:
        """The next ``count`` samples, stacked (the global batch of one step)."""
        return self.samples.take(self.next_indices(count))

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the samples consumed, and what the order depends on (checked on load)."""
        return {"position": self.position, "seed": self.seed, "shuffle": self.shuffle, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the last sample the checkpointed run consumed (the same dataset and seed)."""
        for key in ("seed", "shuffle", "num_samples"):
            if key in state and state[key] != getattr(self, key):
                raise PlaitError(f"the checkpoint's sample stream had {key}={state[key]!r} but this run's has "
                                 f"{getattr(self, key)!r}; resume with the same dataset and seed, or start a new run")
        self.position = int(state["position"])

