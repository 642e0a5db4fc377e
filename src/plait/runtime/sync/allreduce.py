"""All-reduce synchronizer: wait-free buckets over a counted ring all-reduce, with optional compression.

Gradients are averaged bucket by bucket. A post-accumulate-grad hook counts each bucket's ready gradients;
when the next bucket in index order is complete it is packed (a copy) and handed to this synchronizer's
communication thread, which all-reduces it while autograd goes on with earlier layers (Poseidon's wait-free
backprop). ``finish()`` launches whatever is left (unused parameters count as zeros), waits, and writes the
averages into ``.grad``. Buckets launch in the same order on every rank, and only the communication thread
talks on the synchronizer's private group, so the messages always match.

Compression: ``fp16``/``bf16`` divide by the group size, cast, ring-all-reduce in that dtype (half the bytes)
and cast back; ``powersgd`` sends rank-r factors of every parameter with two or more dimensions whose factors
are smaller than the matrix, r(n + m) < n·m (see ``powersgd.py``), and all-reduces the rest (vectors such as
biases and norms, small matrices) uncompressed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from plait.errors import PlaitError
from plait.runtime.sync.counter import ByteCounter
from plait.runtime.sync.p2p import private_group, ring_all_reduce
from plait.runtime.sync.powersgd import PowerSGD, split_like

CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
COMPRESSIONS = (None, "fp16", "bf16", "powersgd")


@dataclass
class _Bucket:
    """Parameters whose gradients are all-reduced together, and this step's state."""

    index: int
    names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]
    ready: int = 0
    future: Future[list[torch.Tensor]] | None = field(default=None, repr=False)


class AllReduceSync:
    """Averages the gradients of ``named_params`` over ``group`` in wait-free buckets, optionally compressed."""

    kind = "allreduce"
    updates_parameters = False  # the caller's optimizer steps these parameters

    def __init__(
        self,
        named_params: Sequence[tuple[str, nn.Parameter]],
        *,
        buckets: Sequence[Sequence[str]] | None = None,
        group: dist.ProcessGroup | None = None,
        compress: str | None = None,
        compress_rank: int = 1,
        error_feedback: bool = True,
        seed: int = 0,
        name: str = "allreduce",
    ) -> None:
        if compress not in COMPRESSIONS:
            raise PlaitError(f"compress {compress!r} is not one of none, fp16, bf16, powersgd")
        self.name = name
        self.compress = compress
        self.group = private_group(group)
        self.size = self.group.size()
        self.counter = ByteCounter()
        self.powersgd = PowerSGD(compress_rank, error_feedback=error_feedback, seed=seed) if compress == "powersgd" else None
        self.buckets = _make_buckets(named_params, buckets)
        self.step_index = 0  # finished steps: the step that bytes sent now belong to
        self.num_overlapped = 0  # buckets launched from a hook, during backward (the rest wait for finish())
        self._next = 0
        self._sync = True
        self._buffers: dict[tuple[int, int], torch.Tensor] = {}  # packed buckets, kept between steps
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"plait-{name}")
        self._handles: list[RemovableHandle] = [
            p.register_post_accumulate_grad_hook(self._hook(b)) for b in self.buckets for p in b.params
        ]

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of the parameters this synchronizer averages."""
        return tuple(n for b in self.buckets for n in b.names)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside the block only accumulate gradients locally (for all but the last micro-batch)."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def finish(self) -> None:
        """Launch the buckets still pending, wait for every all-reduce and put the averages into ``.grad``."""
        try:
            self._launch_ready(force=True)
            for bucket in self.buckets:
                assert bucket.future is not None
                for p, avg in zip(bucket.params, bucket.future.result(), strict=True):
                    p.grad = avg.view_as(p)
        finally:
            for bucket in self.buckets:
                bucket.ready, bucket.future = 0, None
            self._next = 0
            self.step_index += 1

    def close(self) -> None:
        """Remove the hooks and stop the communication thread (the private group lives until teardown)."""
        for handle in self._handles:
            handle.remove()
        self._pool.shutdown(wait=True)

    # ---- autograd side -------------------------------------------------------------------------

    def _hook(self, bucket: _Bucket) -> Callable[[torch.Tensor], None]:
        def on_grad_ready(_param: torch.Tensor) -> None:
            if not self._sync:
                return
            if bucket.future is not None:
                raise PlaitError(f"{self.name}: a second backward before finish(); run the micro-batches before the "
                                 "last inside no_sync()")
            bucket.ready += 1
            if bucket.ready == len(bucket.params):
                self.num_overlapped += self._launch_ready(force=False)

        return on_grad_ready

    def _launch_ready(self, *, force: bool) -> int:
        """Hand complete buckets to the communication thread in index order (all the rest when ``force``); how many."""
        launched = 0
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if not force and bucket.ready < len(bucket.params):
                break
            # read in place by the communication thread: nothing writes these gradients before finish() replaces them
            grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
            bucket.future = self._pool.submit(self._average, bucket.index, grads, self.step_index)
            self._next += 1
            launched += 1
        return launched

    # ---- communication thread ------------------------------------------------------------------

    def _average(self, index: int, grads: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        """The group mean of each gradient (compressed as configured) of bucket ``index``."""
        names = self.buckets[index].names
        key = (index, step % 2)  # two kept buffers per bucket, in turn (see _average_flat)

        def reduce(flat: torch.Tensor) -> None:
            ring_all_reduce(flat, self.group, self.counter, step)

        if self.powersgd is None:
            return self._average_flat(grads, reduce, key)
        mats = [i for i, g in enumerate(grads) if self.powersgd.worth_it(g)]
        out = list(grads)
        approx = self.powersgd.average([(names[i], _matrix(grads[i])) for i in mats], reduce, self.size)
        for i, a in zip(mats, approx, strict=True):
            out[i] = a.view_as(grads[i])
        compressed = set(mats)
        plain = [i for i in range(len(grads)) if i not in compressed]
        for i, avg in zip(plain, self._average_flat([grads[i] for i in plain], reduce, key), strict=True):
            out[i] = avg
        return out

    def _average_flat(self, grads: list[torch.Tensor], reduce: Callable[[torch.Tensor], None],
                      key: tuple[int, int]) -> list[torch.Tensor]:
        """Pack, divide by the group size, all-reduce (in the cast dtype, if any), unpack.

        The packed buffers are kept per ``key`` (the bucket and the step's parity) rather than allocated every step:
        fresh large buffers cost page faults on a CPU. The averages returned are views of this step's buffer, which
        stays untouched until two steps later, when the gradients hold the next step's views."""
        if not grads:
            return []
        numel = sum(g.numel() for g in grads)
        flat = self._buffer(key, numel, grads[0].dtype, grads[0].device)
        torch.cat([g.reshape(-1) for g in grads], out=flat).div_(self.size)
        cast = CAST_DTYPES.get(self.compress or "")
        if cast is None:
            reduce(flat)
        else:
            sent = self._buffer((key[0], -1), numel, cast, flat.device).copy_(flat)
            reduce(sent)
            flat.copy_(sent)
        return split_like(flat, grads)

    def _buffer(self, key: tuple[int, int], numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The kept buffer of ``key``, made (again) when it does not fit this request."""
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() != numel or buffer.dtype != dtype or buffer.device != device:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer


def _matrix(t: torch.Tensor) -> torch.Tensor:
    """A parameter-shaped tensor as the matrix PowerSGD factors: (shape[0], everything else)."""
    return t.reshape(t.shape[0], -1)


def _make_buckets(named_params: Sequence[tuple[str, nn.Parameter]], buckets: Sequence[Sequence[str]] | None) -> list[_Bucket]:
    """The buckets by name (default: one bucket of every parameter); each parameter in exactly one."""
    params = dict(named_params)
    layout = [list(b) for b in buckets] if buckets is not None else [list(params)]
    seen: set[str] = set()
    out = []
    for i, names in enumerate(layout):
        unknown = [n for n in names if n not in params]
        if unknown or not names:
            raise PlaitError(f"all-reduce bucket {i} is empty or names parameters it does not synchronise: {unknown}")
        if seen & set(names):
            raise PlaitError(f"all-reduce bucket {i} repeats parameters {sorted(seen & set(names))}; each is in one bucket")
        seen |= set(names)
        out.append(_Bucket(i, tuple(names), tuple(params[n] for n in names)))
    missing = [n for n in params if n not in seen]
    if missing:
        raise PlaitError(f"all-reduce buckets leave out {missing}; put every parameter in one bucket")
    return out
