"""The training loop's side of adaptive training: one step's norms, the noise scale, the learning-rate factor, progress.

Per optimizer step the runtime fills a ``GradNormProbe`` while it synchronises the gradients (hooks
installed by the applied plan). ``AdaptiveTracker.after_backward`` launches the asynchronous all-reduce of
the step's two numbers and folds the *previous* step's pair, finished long ago, into the ``GradNoiseScale``.
The statistics therefore lag one step; neither the tiny all-reduce nor reading its result holds the step
up (on a GPU the result reaches the host through a pinned copy, on the CPU gloo sums it in the background). ``optimizer_step`` multiplies every param group's
learning rate by the rule's factor around ``optimizer.step()`` and counts the step's progress.

While the batch is the initial one (``M == M0``) the scale is 1, the gain is exactly 1 and the learning
rate is left untouched, so training is bit-identical to a run without adaptivity.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from plait.adaptive.gradnorms import GradNormProbe
from plait.adaptive.noise import NormSample, check_batches
from plait.adaptive.scaling import Progress, lr_factor
from plait.adaptive.smoothing import DEFAULT_SMOOTHING, GradNoiseScale
from plait.errors import PlaitError


@dataclass(frozen=True, kw_only=True)
class ProbeLayout:
    """How one step's norm shares add up over the job's ranks: the batch sizes and counts ``combine`` needs."""

    small_batch: float  # samples behind each local gradient
    big_batch: float  # samples behind the synchronised gradient
    num_local: int  # local gradients the shares of every rank add up to
    synced_copies: int  # ranks that add the same share of the synchronised gradient

    def __post_init__(self) -> None:
        check_batches(self.small_batch, self.big_batch)


@dataclass(frozen=True, kw_only=True)
class AdaptiveStats:
    """What adaptive training knew at one optimizer step (statistics of the steps before it)."""

    batch_size: int  # global batch of the step
    noise_scale: float  # smoothed gradient noise scale (0 before the first estimate)
    efficiency: float  # statistical efficiency of the batch against the initial one
    gain: float  # AdaScale gain: initial-batch steps this step is worth
    lr_factor: float  # factor the learning rate was multiplied by
    progress: float  # scale-invariant iterations done after the step


@contextmanager
def scaled_lr(optimizer: torch.optim.Optimizer, factor: float) -> Iterator[None]:
    """Every param group's learning rate times ``factor`` inside the block (untouched when the factor is 1)."""
    if factor == 1.0:
        yield
        return
    saved = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, saved, strict=True):
            group["lr"] = lr


def _all_reduce_async(pair: torch.Tensor, group: dist.ProcessGroup | None) -> dist.Work | None:
    """Start summing ``pair`` over ``group`` (nothing to do without torch.distributed or with one rank)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        return dist.all_reduce(pair, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return None


class _Pending:
    """A step's norm shares being summed over the ranks and brought to the host."""

    def __init__(self, pair: torch.Tensor, layout: ProbeLayout, group: dist.ProcessGroup | None) -> None:
        self.layout = layout
        self.work = _all_reduce_async(pair, group)
        self.event: torch.cuda.Event | None = None
        self.host = pair
        if pair.device.type == "cuda":  # the stream waits for the sum, then copies it out: the host does not wait
            if self.work is not None:
                self.work.wait()
                self.work = None
            self.host = torch.empty(2, dtype=pair.dtype, pin_memory=True)
            self.host.copy_(pair, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def sample(self) -> NormSample:
        """The step's ``NormSample`` (the sum and the copy are long done by the next step)."""
        if self.work is not None:
            self.work.wait()
        if self.event is not None:
            self.event.synchronize()
        local, synced = self.host.tolist()
        lay = self.layout
        return NormSample(small_batch=lay.small_batch, small_sqnorm=max(local / lay.num_local, 0.0),
                          big_batch=lay.big_batch, big_sqnorm=max(synced / lay.synced_copies, 0.0))


class AdaptiveTracker:
    """Noise scale, learning-rate factor and progress of one training run, updated once per optimizer step."""

    def __init__(self, *, init_batch_size: int, batch_size: int, rule: str, smoothing: float = DEFAULT_SMOOTHING,
                 probe: GradNormProbe | None = None, layout: ProbeLayout | None = None,
                 group: dist.ProcessGroup | None = None) -> None:
        if (probe is None) != (layout is None):
            raise PlaitError("an adaptive tracker needs both a probe and its layout, or neither (no estimate)")
        self.gns = GradNoiseScale(init_batch_size, smoothing=smoothing)
        self.progress = Progress()
        self.rule = rule
        self.batch_size = batch_size
        self.probe, self.layout, self.group = probe, layout, group  # the norms are summed over ``group``
        self._pending: _Pending | None = None
        lr_factor(rule, scale=batch_size / init_batch_size, gain=1.0)  # an unknown rule fails here, not at step 1

    @property
    def init_batch_size(self) -> float:
        """The batch ``M0`` the learning rate was tuned for."""
        return self.gns.init_batch_size

    def after_backward(self) -> None:
        """Start summing this step's norms over the ranks (one asynchronous all-reduce of two numbers); fold in the
        previous step's."""
        pending = None
        if self.probe is not None and self.layout is not None:
            pending = _Pending(self.probe.shares(), self.layout, self.group)
        elif self.probe is not None:  # a batch without an estimate (set_batch): drop the step's norms
            self.probe.reset()
        self.flush()
        self._pending = pending

    def set_batch(self, batch_size: int, layout: ProbeLayout | None) -> None:
        """Train with another global batch from the next step on (adaptive batch): the gain and learning-rate factor
        follow it, and the norms are combined with the new batch's ``layout`` (None: this batch gives no estimate;
        the probe's norms are then dropped). A step still in flight keeps the layout it was taken with."""
        check_batches(batch_size)
        self.batch_size = int(batch_size)
        self.layout = layout if self.probe is not None else None

    def flush(self) -> None:
        """Fold the step still in flight into the statistics (before a checkpoint, and at the end of a run)."""
        if self._pending is not None:
            self.gns.update(self._pending.sample())
            self._pending = None

    def gain(self) -> float:
        """AdaScale gain of the current batch against the initial one (exactly 1 while they are equal)."""
        if self.batch_size == self.init_batch_size:
            return 1.0
        return self.gns.gain(self.batch_size)

    def lr_factor(self) -> float:
        """The factor on the initial learning rate for the current batch, by the run's rule."""
        return lr_factor(self.rule, scale=self.batch_size / self.init_batch_size, gain=self.gain())

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> AdaptiveStats:
        """``optimizer.step()`` with the scaled learning rate; count the step's progress; what the step used."""
        gain, factor = self.gain(), self.lr_factor()
        with scaled_lr(optimizer, factor):
            optimizer.step()
        if self.probe is not None and self.probe.preconditioner is not None:
            self.probe.preconditioner.after_step(optimizer)
        self.progress.add(gain)
        return AdaptiveStats(batch_size=self.batch_size, noise_scale=self.gns.noise_scale,
                             efficiency=gain * self.init_batch_size / self.batch_size, gain=gain, lr_factor=factor,
                             progress=self.progress.iterations)

    def state_dict(self) -> dict[str, Any]:
        """Estimator and progress state for a checkpoint (call ``flush`` first to include the last step)."""
        return {"gns": self.gns.state_dict(), "progress": self.progress.state_dict(), "rule": self.rule}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (the initial batch must be the same)."""
        self.gns.load_state_dict(state["gns"])
        self.progress.load_state_dict(state["progress"])
        self._pending = None
