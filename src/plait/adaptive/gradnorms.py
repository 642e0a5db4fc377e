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
from plait.adaptive.precondition import AdamPreconditioner
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


Part = tuple[torch.Tensor, float]  # (a norm, the weight of its square)


def _norm_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of plain tensors as a 0-dim tensor (float32 accumulation for half precision; one fused
    ``foreach`` kernel for a list of float32/float64 tensors)."""
    if len(tensors) == 1 or any(t.dtype in LOW_PRECISION for t in tensors):
        norms = [torch.linalg.vector_norm(t, dtype=torch.float32 if t.dtype in LOW_PRECISION else None) for t in tensors]
        return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    return torch.nn.utils.get_total_norm(tensors, 2.0)


def norm_parts(tensors: Iterable[torch.Tensor], *, scale: float = 1.0) -> list[Part]:
    """The norms of ``tensors``' entries on this rank, each with the weight of its square (``scale ** 2``, divided
    by the ranks holding the same DTensor elements): their weighted squares add up to ``squared_norm``'s value.
    No arithmetic beyond the norm kernels, so that a step's parts are squared and summed in one go."""
    items = list(tensors)
    if len(items) == 1 and not isinstance(items[0], DTensor):  # a flat buffer: the hot path, one kernel
        flat = items[0].detach()
        return [(torch.linalg.vector_norm(flat, dtype=torch.float32 if flat.dtype in LOW_PRECISION else None),
                 scale * scale)]
    by_copies: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad():
        for t in items:
            copies = 1
            if isinstance(t, DTensor):
                copies = _copies(t)
                t = t.to_local()
            by_copies.setdefault(copies, []).append(t)
        parts: list[Part] = []
        for copies, group in by_copies.items():
            weight = scale * scale / copies
            if len(group) > 1 and all(t.dtype in (torch.float32, torch.float64) for t in group):
                parts += [(norm, weight) for norm in torch._foreach_norm(group)]  # one dispatch for many tensors
            else:
                parts.append((_norm_of(group), weight))
        return parts


def sum_of_parts(parts: list[Part], *, device: torch.device | None = None) -> torch.Tensor:
    """``sum(weight * norm ** 2)`` over ``parts`` as a float64 0-dim tensor: a few kernels whatever their number."""
    by_weight: dict[float, list[torch.Tensor]] = {}
    for norm, weight in parts:
        by_weight.setdefault(weight, []).append(norm)
    total: torch.Tensor | None = None
    with torch.no_grad():
        for weight, norms in by_weight.items():
            if len(norms) == 1:
                part = norms[0].double().square()
            else:
                same = len({n.dtype for n in norms}) == 1
                stacked = torch.stack(norms if same else [n.double() for n in norms])
                part = torch.linalg.vector_norm(stacked, dtype=torch.float64).square()
            part = part * weight if weight != 1.0 else part
            total = part if total is None else total + part.to(total.device)
    if total is None:
        return torch.zeros((), dtype=torch.float64, device=device)
    return total


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


def placed_grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters' gradients with their parameters' placements: a gradient still pending a ``Partial`` sum
    on a model axis is reduced into a temporary (a collective over that axis; the gradient is left as it is)."""
    out = []
    for param in params:
        grad = param.grad
        if grad is None:
            continue
        if isinstance(param, DTensor) and isinstance(grad, DTensor) and grad.placements != param.placements:
            grad = grad.redistribute(param.device_mesh, param.placements)
        out.append(grad)
    return out


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
        self._local: list[Part] | None = None  # norms taken this step, squared and summed once in ``shares``
        self._synced: list[Part] | None = None  # (None until added to: a rank may add an empty share)
        self.preconditioner: AdamPreconditioner | None = None  # norm Adam-preconditioned gradients (Pollux)

    def add_local(self, tensors: Iterable[torch.Tensor], *, scale: float = 1.0) -> None:
        """Add the squared norm of local gradient pieces, times ``scale ** 2`` (e.g. ``num_micro`` for ``grad / num_micro``)."""
        self._local = (self._local or []) + norm_parts(self._weighted(tensors), scale=scale)

    def add_synced(self, tensors: Iterable[torch.Tensor], *, scale: float = 1.0) -> None:
        """Add the squared norm of this rank's pieces of the synchronised gradient, times ``scale ** 2``."""
        self._synced = (self._synced or []) + norm_parts(self._weighted(tensors), scale=scale)

    def _weighted(self, tensors: Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
        pre = self.preconditioner
        if pre is None or not pre.ready:
            return tensors
        return [pre.apply(t) for t in tensors]

    def _take(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._local is None or self._synced is None:
            raise PlaitError("the probe needs add_local (before the gradients are synchronised) and add_synced (after) "
                             "in every step before its norms are combined")
        local = sum_of_parts(self._local, device=self.device)
        synced = sum_of_parts(self._synced, device=self.device)
        self.reset()
        return local, synced

    def shares(self) -> torch.Tensor:
        """This rank's ``[local, synchronised]`` shares as one float64 tensor on the device (to sum over the ranks
        asynchronously, then divide as ``combine_norms`` does); resets."""
        local, synced = self._take()
        return torch.stack([local, synced.to(local.device)])

    def combine(self, *, num_local: int, synced_copies: int = 1, group: dist.ProcessGroup | None = None,
                reduce: ReduceFn | None = None) -> torch.Tensor:
        """``[mean local squared norm, synchronised squared norm]`` on the device (see ``combine_norms``); resets."""
        local, synced = self._take()
        return combine_norms(local, synced, num_local=num_local, synced_copies=synced_copies, group=group, reduce=reduce)

    def sample(self, *, small_batch: float, big_batch: float, num_local: int, synced_copies: int = 1,
               group: dist.ProcessGroup | None = None, reduce: ReduceFn | None = None) -> NormSample:
        """The step's ``NormSample`` (waits for the device); resets the probe."""
        small, big = self.combine(num_local=num_local, synced_copies=synced_copies, group=group, reduce=reduce).tolist()
        return NormSample(small_batch=small_batch, small_sqnorm=small, big_batch=big_batch, big_sqnorm=big)

    def reset(self) -> None:
        """Forget what was added (a step whose statistics are not wanted)."""
        self._local = self._synced = None
