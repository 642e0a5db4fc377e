"""Torch side of the noise-scale estimator: squared gradient norms a step already has, combined over ranks.

Per step a rank adds two numbers:

* before the gradients are synchronised, the squared norm of its *local* gradient (a bucket's flat buffer
  before its all-reduce, the input of an FSDP2 reduce-scatter, the first accumulated micro-batch);
* after, the squared norm of the part of the *synchronised* gradient it holds.

Both may be partial: a rank that holds a shard (FSDP2, tensor-parallel DTensors, a pipeline stage) adds
its shard's share, and the shares add up over the group. One all-reduce of a two-element tensor then
gives the mean local squared norm and the synchronised squared norm. Nothing here copies a gradient:
one ``vector_norm`` per tensor (per bucket, for flat buffers) and one tiny collective per step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from plait.adaptive.noise import NormSample
from plait.errors import PlaitError

ReduceFn = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over the ranks (in place or not) and returns it


def _copies(t: DTensor) -> int:
    """How many ranks of the DTensor's mesh hold each of its elements (the Replicate axes' sizes multiplied)."""
    copies = 1
    for axis, placement in enumerate(t.placements):
        if placement.is_partial():
            raise PlaitError("a gradient is still a Partial sum on a model axis; take its norm after reducing it "
                             "to the parameter's placements (AppliedPlan.before_optimizer_step)")
        if placement.is_replicate():
            copies *= t.device_mesh.size(axis)
    return copies


LOW_PRECISION = (torch.float16, torch.bfloat16)  # normed with float32 accumulation and output


def _sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of plain tensors as a float64 0-dim tensor: one kernel for one (flat) tensor, a fused
    ``foreach`` norm (``torch.nn.utils.get_total_norm``) for a list of float32/float64 tensors."""
    if len(tensors) == 1 or any(t.dtype in LOW_PRECISION for t in tensors):
        norms = [torch.linalg.vector_norm(t, dtype=torch.float32 if t.dtype in LOW_PRECISION else None)
                 for t in tensors]
        return (norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))).double().square()
    return torch.nn.utils.get_total_norm(tensors, 2.0).double().square()


def squared_norm(tensors: Iterable[torch.Tensor], *, device: torch.device | None = None,
                 count_replicas_once: bool = True) -> torch.Tensor:
    """Sum of squares of this rank's entries of ``tensors`` as a float64 0-dim tensor on their device (no host sync).

    A DTensor contributes its local shard; with ``count_replicas_once`` its share is divided by the number
    of ranks of its mesh that hold the same elements, so summing over the mesh counts each element once.
    Half-precision tensors are normed with float32 accumulation. ``device`` places the 0 of an empty list.
    Prefer a few large flat tensors (bucket buffers) to many small ones: the cost is per kernel launch.
    """
    by_copies: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad():
        for t in tensors:
            copies = 1
            if isinstance(t, DTensor):
                copies = _copies(t) if count_replicas_once else 1
                t = t.to_local()
            by_copies.setdefault(copies, []).append(t)
        total: torch.Tensor | None = None
        for copies, group in by_copies.items():
            part = _sum_of_squares(group)
            part = part / copies if copies > 1 else part
            total = part if total is None else total + part.to(total.device)
    if total is None:
        return torch.zeros((), dtype=torch.float64, device=device)
    return total


def all_reduce_sum(group: dist.ProcessGroup | None = None) -> ReduceFn:
    """A reduce function that sums over ``group`` with one all-reduce (the identity without torch.distributed)."""

    def reduce(t: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    return reduce


def combine_norms(local: torch.Tensor, synced: torch.Tensor, *, num_local: int, synced_copies: int = 1,
                  group: dist.ProcessGroup | None = None, reduce: ReduceFn | None = None) -> torch.Tensor:
    """``[mean local squared norm, synchronised squared norm]`` over the group, from one all-reduce of two numbers.

    ``local`` and ``synced`` are this rank's shares. ``num_local`` is how many local gradients the shares of
    the whole group add up to (data-parallel replicas x micro-batches measured per replica);
    ``synced_copies`` is how many ranks of the group add the same share of the synchronised gradient (the
    data-parallel degree when every replica holds it, 1 when it is sharded over the group). ``reduce``
    replaces the all-reduce over ``group``. The result stays on the device: read it when convenient.
    """
    if num_local < 1 or synced_copies < 1:
        raise PlaitError(f"num_local ({num_local}) and synced_copies ({synced_copies}) must be at least 1")
    pair = torch.stack([local.to(torch.float64), synced.to(device=local.device, dtype=torch.float64)])
    pair = (reduce or all_reduce_sum(group))(pair)
    pair[0].div_(num_local)  # Python divisors: no host-to-device copy
    pair[1].div_(synced_copies)
    return pair


class GradNormProbe:
    """Collects this rank's shares of one step's local and synchronised squared norms, then combines them.

    Call ``add_local`` before the gradients are synchronised (once or per micro-batch/bucket/unit),
    ``add_synced`` after, and ``sample`` (or ``combine``) once per step; both reset the probe.
    """

    def __init__(self, *, device: torch.device | None = None) -> None:
        self.device = device
        self._local: torch.Tensor | None = None
        self._synced: torch.Tensor | None = None

    def add_local(self, tensors: Iterable[torch.Tensor], *, scale: float = 1.0) -> None:
        """Add the squared norm of local gradient pieces, times ``scale ** 2`` (e.g. ``num_micro`` for ``grad / num_micro``)."""
        self._local = self._add(self._local, squared_norm(tensors, device=self.device), scale)

    def add_synced(self, tensors: Iterable[torch.Tensor], *, scale: float = 1.0) -> None:
        """Add the squared norm of this rank's pieces of the synchronised gradient, times ``scale ** 2``."""
        self._synced = self._add(self._synced, squared_norm(tensors, device=self.device), scale)

    @staticmethod
    def _add(total: torch.Tensor | None, part: torch.Tensor, scale: float) -> torch.Tensor:
        part = part * (scale * scale) if scale != 1.0 else part
        return part if total is None else total + part.to(total.device)

    def combine(self, *, num_local: int, synced_copies: int = 1, group: dist.ProcessGroup | None = None,
                reduce: ReduceFn | None = None) -> torch.Tensor:
        """``[mean local squared norm, synchronised squared norm]`` on the device (see ``combine_norms``); resets."""
        if self._local is None or self._synced is None:
            raise PlaitError("the probe needs add_local (before the gradients are synchronised) and add_synced (after) "
                             "in every step before combine")
        local, synced = self._local, self._synced
        self.reset()
        return combine_norms(local, synced, num_local=num_local, synced_copies=synced_copies, group=group, reduce=reduce)

    def sample(self, *, small_batch: float, big_batch: float, num_local: int, synced_copies: int = 1,
               group: dist.ProcessGroup | None = None, reduce: ReduceFn | None = None) -> NormSample:
        """The step's ``NormSample`` (waits for the device); resets the probe."""
        small, big = self.combine(num_local=num_local, synced_copies=synced_copies, group=group, reduce=reduce).tolist()
        return NormSample(small_batch=small_batch, small_sqnorm=small, big_batch=big_batch, big_sqnorm=big)

    def reset(self) -> None:
        """Forget what was added (a step whose statistics are not wanted)."""
        self._local = self._synced = None
