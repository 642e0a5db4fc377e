"""The training loop's side of adaptive training: one step's norms, the noise scale, the learning-rate factor, progress.

Per optimizer step the runtime fills a ``GradNormProbe`` while it synchronises the gradients (hooks
installed by the applied plan). ``AdaptiveTracker.after_backward`` keeps the step's two numbers; every
``reduce_every`` steps (4) it launches one asynchronous all-reduce of the kept pairs, and it folds the pairs
launched before, finished long ago, into the ``GradNoiseScale``. The statistics therefore lag a few steps;
neither the tiny all-reduce nor reading its result holds the step up (on a GPU the result reaches the host
through a pinned copy, on the CPU gloo sums it in the background). ``optimizer_step`` multiplies every param group's
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
    """A few steps' norm shares (one row each) being summed over the ranks and brought to the host."""

    def __init__(self, pairs: torch.Tensor, layouts: list[ProbeLayout], group: dist.ProcessGroup | None) -> None:
        self.layouts = layouts
        self.work = _all_reduce_async(pairs, group)
        self.event: torch.cuda.Event | None = None
        self.host = pairs
        if pairs.device.type == "cuda":  # the stream waits for the sum, then copies it out: the host does not wait
            if self.work is not None:
                self.work.wait()
                self.work = None
            self.host = torch.empty(pairs.shape, dtype=pairs.dtype, pin_memory=True)
            self.host.copy_(pairs, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def samples(self) -> list[NormSample]:
        """The steps' ``NormSample``s, oldest first (the sum and the copy are long done by the next step)."""
        if self.work is not None:
            self.work.wait()
        if self.event is not None:
            self.event.synchronize()
        return [NormSample(small_batch=lay.small_batch, small_sqnorm=max(local / lay.num_local, 0.0),
                           big_batch=lay.big_batch, big_sqnorm=max(synced / lay.synced_copies, 0.0))
                for (local, synced), lay in zip(self.host.tolist(), self.layouts, strict=True)]


DEFAULT_REDUCE_EVERY = 4  # steps whose norm shares are summed over the ranks by one all-reduce


class AdaptiveTracker:
    """Noise scale, learning-rate factor and progress of one training run, updated once per optimizer step.

    ``reduce_every`` steps' norm shares go to the ranks in one all-reduce (launching one costs about 70 us of CPU
    on gloo, a few per cent of a small model's step); the statistics then lag up to that many steps, and every rank
    folds the same steps in at the same step, so their learning-rate factors stay equal."""

    def __init__(self, *, init_batch_size: int, batch_size: int, rule: str, smoothing: float = DEFAULT_SMOOTHING,
                 probe: GradNormProbe | None = None, layout: ProbeLayout | None = None,
                 group: dist.ProcessGroup | None = None, reduce_every: int = DEFAULT_REDUCE_EVERY) -> None:
        if (probe is None) != (layout is None):
            raise PlaitError("an adaptive tracker needs both a probe and its layout, or neither (no estimate)")
        if reduce_every < 1:
            raise PlaitError(f"reduce_every is {reduce_every}; sum the norms over the ranks every 1 or more steps")
        self.gns = GradNoiseScale(init_batch_size, smoothing=smoothing)
        self.progress = Progress()
        self.rule = rule
        self.batch_size = batch_size
        self.probe, self.layout, self.group = probe, layout, group  # the norms are summed over ``group``
        self.reduce_every = reduce_every
        self._staged: list[tuple[torch.Tensor, ProbeLayout]] = []  # this rank's shares not yet being summed
        self._pending: _Pending | None = None
        lr_factor(rule, scale=batch_size / init_batch_size, gain=1.0)  # an unknown rule fails here, not at step 1

    @property
    def init_batch_size(self) -> float:
        """The batch ``M0`` the learning rate was tuned for."""
        return self.gns.init_batch_size

    def after_backward(self) -> None:
        """Keep this step's norm shares; fold in the steps whose sum was started before; every ``reduce_every`` steps
        start summing the kept ones over the ranks (one asynchronous all-reduce)."""
        if self.probe is not None and self.layout is not None:
            self._staged.append((self.probe.shares(), self.layout))
        elif self.probe is not None:  # a batch without an estimate (set_batch): drop the step's norms
            self.probe.reset()
        self._fold()
        if len(self._staged) >= self.reduce_every:
            self._launch()

    def _launch(self) -> None:
        if self._staged:
            pairs = torch.stack([pair for pair, _ in self._staged])
            self._pending = _Pending(pairs, [layout for _, layout in self._staged], self.group)
            self._staged = []

    def _fold(self) -> None:
        if self._pending is not None:
            for sample in self._pending.samples():
                self.gns.update(sample)
            self._pending = None

    def set_batch(self, batch_size: int, layout: ProbeLayout | None) -> None:
        """Train with another global batch from the next step on (adaptive batch): the gain and learning-rate factor
        follow it, and the norms are combined with the new batch's ``layout`` (None: this batch gives no estimate;
        the probe's norms are then dropped). A step still in flight keeps the layout it was taken with."""
        check_batches(batch_size)
        self.batch_size = int(batch_size)
        self.layout = layout if self.probe is not None else None

    def flush(self) -> None:
        """Fold every step taken into the statistics (before a checkpoint, and at the end of a run; every rank at
        the same step: it sums what is kept over the ranks and waits for it)."""
        self._fold()
        self._launch()
        self._fold()

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
        self.progress.add(gain)
        if self.probe is not None and self.probe.preconditioner is not None:
            self.probe.preconditioner.after_step(optimizer, self.progress.steps)
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
        self._staged = []

    def refresh_weights(self, optimizer: torch.optim.Optimizer) -> None:
        """Read the probe's Adam weights (if any) from ``optimizer``'s state now. The Trainer does it when it writes a
        checkpoint and when it resumes from one, so a resumed run weighs its norms as the run it continues does."""
        if self.probe is not None and self.probe.preconditioner is not None:
            self.probe.preconditioner.refresh(optimizer)
