"""Replicated data parallelism with wait-free backprop (Poseidon WFBP) over bucketed all-reduce.

Each parameter's gradient lives as a view of its bucket's flat buffer. A post-accumulate-grad hook
counts the bucket's ready gradients; once a bucket is complete its all-reduce is launched
asynchronously (buckets launch in index order on every rank, so the collectives match), while
autograd goes on computing earlier layers. A callback queued on the autograd engine runs when
backward ends: it launches any bucket still pending (parameters unused in this step), waits for
every all-reduce and records the step's timings.

Parameters may be DTensors on other (model) mesh axes: a bucket then holds their local shards, and
each such ``.grad`` is a DTensor with the parameter's placements whose local tensor is a view of the
bucket (no copies). A gradient that arrives with other placements (a ``Partial`` sum for a replicated
weight used on sharded activations) is reduced over the model axes to the parameter's placements
first: inside autograd's in-place accumulation into the view, or, when the gradient was set to None,
by the hook, which then copies it into the view.

With a ``GradNormProbe`` attached (adaptive training), each bucket's buffer is normed just before its
all-reduce (the rank's local gradient), and after the last all-reduce finished each replica norms its
share of the synchronised buffers (bucket ``i`` on the replica ``i % size``, so each is normed once over
the group): one norm kernel per flat buffer, no copies. Without a probe, nothing extra runs.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from plait.adaptive.gradnorms import GradNormProbe
from plait.errors import PlaitError

MAX_TRACES = 256


@dataclass(frozen=True, kw_only=True)
class StepTrace:
    """Timings of one synchronised backward (``time.perf_counter`` seconds, comparable across local ranks)."""

    first_grad_s: float  # first gradient ready (backward is under way)
    bucket_launch_s: tuple[float, ...]  # all-reduce launch time, by bucket index
    bucket_done_s: tuple[float, ...]  # all-reduce completion time, by bucket index
    backward_end_s: float  # autograd finished computing every gradient
    sync_end_s: float  # every all-reduce finished


class _Bucket:
    """One flat gradient buffer and the parameters whose gradients are views of it (of their local shards)."""

    def __init__(self, index: int, names: Sequence[str], params: Sequence[nn.Parameter]) -> None:
        self.index = index
        self.names = tuple(names)
        self.params = tuple(params)
        shards = [_local_shard(p) for p in params]
        numel = sum(s.numel() for s in shards)
        self.buffer = torch.zeros(numel, dtype=shards[0].dtype, device=shards[0].device)
        self.views: list[torch.Tensor] = []  # each parameter's local gradient, in the buffer
        self.grads: list[torch.Tensor] = []  # what each ``.grad`` is: the view, or a DTensor around it
        offset = 0
        for p, shard in zip(params, shards, strict=True):
            view = self.buffer[offset : offset + shard.numel()].view_as(shard)
            self.views.append(view)
            self.grads.append(_wrap_like(view, p))
            offset += shard.numel()
        self.num_ready = 0
        self.work: dist.Work | None = None
        self.sent = self.buffer  # what the all-reduce works on (a narrower copy under a reduce dtype)
        self.launch_s = 0.0
        self.done_s = 0.0
        # what a gradient-norm probe norms: the flat buffer, or the DTensor gradients when some hold local
        # shards of model-axis DTensors (their shares of replicated elements are counted once over the axis)
        self.plain = not any(isinstance(p, DTensor) for p in params)
        self.norm_pieces: list[torch.Tensor] = [self.buffer] if self.plain else list(self.grads)
        self._share: tuple[tuple[int, int], list[torch.Tensor]] | None = None

    def synced_share(self, rank: int, size: int) -> list[torch.Tensor]:
        """What replica ``rank`` of ``size`` norms of the synchronised bucket, so that the replicas' shares add up to
        it once: its slice of a flat buffer (every replica does the same work), or all of a DTensor bucket's
        gradients on the bucket's replica by index."""
        if self.plain:
            if self._share is None or self._share[0] != (rank, size):  # a view made once: this runs every step
                self._share = ((rank, size), [torch.tensor_split(self.buffer, size)[rank]])
            return self._share[1]
        return self.norm_pieces if self.index % size == rank else []

    def mark_done(self, _future: object) -> None:
        """Record when the bucket's all-reduce finished (called by the communication thread)."""
        self.done_s = time.perf_counter()

    def attach_grads(self) -> None:
        """Make every parameter's ``.grad`` a view of this bucket (keeping any gradient already there)."""
        for p, view, grad in zip(self.params, self.views, self.grads, strict=True):
            if p.grad is not None and p.grad is not grad:
                view.copy_(_local_shard(_as_placed(p.grad, p)))
            elif p.grad is None:
                view.zero_()
            p.grad = grad


def _local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself when plain)."""
    return t._local_tensor if isinstance(t, DTensor) else t


def _wrap_like(view: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``view`` as the gradient of ``param``: a DTensor with its placements aliasing ``view``, or ``view``."""
    if not isinstance(param, DTensor):
        return view
    with torch.no_grad():
        mesh, placements, shape = param.device_mesh, param.placements, param.shape
        return DTensor.from_local(view, mesh, placements, run_check=False, shape=shape, stride=param.stride())


def _as_placed(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``grad`` with ``param``'s placements (a collective over the model axes when they differ)."""
    if isinstance(grad, DTensor) and isinstance(param, DTensor) and grad.placements != param.placements:
        return grad.redistribute(param.device_mesh, param.placements)
    return grad


class WaitFreeReplicate:
    """Bucketed, overlapped gradient all-reduce for a model replicated on every rank of ``group``."""

    def __init__(
        self,
        model: nn.Module,
        buckets: Sequence[Sequence[str]],
        *,
        group: dist.ProcessGroup | None = None,
        broadcast_from: int | None = 0,
        reduce_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.group = group
        self.reduce_dtype = reduce_dtype  # all-reduce in this dtype (e.g. bf16 for fp32 gradients), else the buffer's
        self.size = dist.get_world_size(group)
        self.group_rank = dist.get_rank(group)
        self.buckets = _build_buckets(model, buckets)
        self._sync = True
        self._in_backward = False
        self._next = 0
        self._first_grad_s = 0.0
        self.traces: collections.deque[StepTrace] = collections.deque(maxlen=MAX_TRACES)
        self.num_launches = 0
        self.probe: GradNormProbe | None = None  # adaptive training: norms before and after the all-reduce
        if broadcast_from is not None:
            self.broadcast(broadcast_from)
        for bucket in self.buckets:
            bucket.attach_grads()
            for i, param in enumerate(bucket.params):
                param.register_post_accumulate_grad_hook(self._hook(bucket, i))

    # ---- user-facing -------------------------------------------------------------------------

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no communication) for the backward passes inside the block."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def zero_grad(self) -> None:
        """Zero every bucket buffer in place (the gradients stay views of it)."""
        for bucket in self.buckets:
            if any(p.grad is not g for p, g in zip(bucket.params, bucket.grads, strict=True)):
                bucket.attach_grads()
            bucket.buffer.zero_()

    def broadcast(self, src: int = 0) -> None:
        """Copy parameters and buffers from rank ``src`` of the group to every rank."""
        global_src = dist.get_global_rank(self.group, src) if self.group is not None else src
        with torch.no_grad():
            for bucket in self.buckets:
                shards = [_local_shard(p) for p in bucket.params]
                flat = torch.cat([s.reshape(-1) for s in shards])
                dist.broadcast(flat, src=global_src, group=self.group)
                offset = 0
                for s in shards:
                    s.copy_(flat[offset : offset + s.numel()].view_as(s))
                    offset += s.numel()
            for buf in self.model.buffers():
                dist.broadcast(_local_shard(buf), src=global_src, group=self.group)

    # ---- autograd side -----------------------------------------------------------------------

    def _hook(self, bucket: _Bucket, i: int) -> Callable[[torch.Tensor], None]:
        view, grad = bucket.views[i], bucket.grads[i]  # its slot in the bucket, and what its .grad is

        def on_grad_ready(param: torch.Tensor) -> None:
            if not self._in_backward:
                self._in_backward = True
                self._first_grad_s = time.perf_counter()
                torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)
            if param.grad is not grad:  # the user set grads to None: keep the bucket view
                assert param.grad is not None
                view.copy_(_local_shard(_as_placed(param.grad, param)))
                param.grad = grad
            if self._sync:
                bucket.num_ready += 1
                if bucket.num_ready == len(bucket.params):
                    self._launch_ready(force=False)

        return on_grad_ready

    def _launch_ready(self, *, force: bool) -> None:
        """Launch complete buckets in index order (all of the rest when ``force``)."""
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if not force and bucket.num_ready < len(bucket.params):
                return
            if force:
                bucket.attach_grads()  # unused parameters contribute zeros
            if self.probe is not None:
                self.probe.add_local(bucket.norm_pieces)
            bucket.buffer.div_(self.size)
            bucket.launch_s = time.perf_counter()
            bucket.sent = bucket.buffer if self.reduce_dtype in (None, bucket.buffer.dtype) else bucket.buffer.to(self.reduce_dtype)
            bucket.work = dist.all_reduce(bucket.sent, group=self.group, async_op=True)
            bucket.work.get_future().add_done_callback(bucket.mark_done)
            self.num_launches += 1
            self._next += 1

    def _on_backward_end(self) -> None:
        end_s = time.perf_counter()
        try:
            if self._sync:
                self._launch_ready(force=True)
                for bucket in self.buckets:
                    assert bucket.work is not None
                    bucket.work.wait()
                    if bucket.sent is not bucket.buffer:  # reduced in a narrower dtype: back into the gradients
                        bucket.buffer.copy_(bucket.sent)
                if self.probe is not None:  # the replicas' shares of the synchronised buckets add up to them once
                    self.probe.add_synced([piece for bucket in self.buckets
                                           for piece in bucket.synced_share(self.group_rank, self.size)])
                self.traces.append(self._trace(end_s))
        finally:
            for bucket in self.buckets:
                bucket.num_ready, bucket.work, bucket.sent = 0, None, bucket.buffer
            self._next = 0
            self._in_backward = False

    def _trace(self, end_s: float) -> StepTrace:
        sync_end = time.perf_counter()
        return StepTrace(
            first_grad_s=self._first_grad_s,
            bucket_launch_s=tuple(b.launch_s for b in self.buckets),
            bucket_done_s=tuple(b.done_s or sync_end for b in self.buckets),
            backward_end_s=end_s,
            sync_end_s=sync_end,
        )


def _build_buckets(model: nn.Module, buckets: Sequence[Sequence[str]]) -> list[_Bucket]:
    """Check that the plan's buckets name each trainable parameter exactly once, then build them."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    seen: dict[str, int] = {}
    for i, names in enumerate(buckets):
        if not names:
            raise PlaitError(f"bucket {i} of the plan is empty; re-run `plait plan` for this model")
        for name in names:
            if name not in params:
                raise PlaitError(f"the plan's bucket {i} names parameter {name!r}, which the model does not have "
                                 "(or which does not require grad); the plan was made for another model: re-run `plait plan`")
            if name in seen:
                raise PlaitError(f"parameter {name!r} is in buckets {seen[name]} and {i}; each parameter belongs to one bucket")
            seen[name] = i
    missing = [n for n in params if n not in seen]
    if missing:
        raise PlaitError(f"the plan's buckets leave out {len(missing)} parameters ({', '.join(missing[:5])}"
                         f"{', ...' if len(missing) > 5 else ''}); re-run `plait plan` for this model")
    built = []
    for i, names in enumerate(buckets):
        group = [params[n] for n in names]
        if len({(p.dtype, p.device) for p in group}) > 1:
            raise PlaitError(f"bucket {i} mixes dtypes or devices; a bucket holds parameters of one dtype on one device")
        built.append(_Bucket(i, names, group))
    return built
