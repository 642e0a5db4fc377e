"""Measure the peak tensor memory of real code: ``with track_peak_memory() as mem: ...; mem.peak_bytes``.

The CPU allocator keeps no statistics, so on the CPU a tracker follows tensor storages:

* ``method="storages"`` (default): every tensor alive when the block starts is found through the
  garbage collector and its storage size noted; a dispatch mode sees every op's tensors, adds new
  storages, and after each op sums the current size of every tracked storage (so storage resizes, as
  FSDP2 does to free and re-gather parameters, count); a storage's death is seen by a weak reference,
  in whichever thread it happens (a collective's background thread often drops the last reference).
  Blind to memory that never becomes a tensor visible to Python (kernel workspaces).
* ``method="allocator"``: ``torch.profiler`` with ``profile_memory=True`` reports every allocation and
  free through PyTorch's CPU allocator, workspaces included, but only in the thread that started it:
  a free in a communication thread is missed, so with asynchronous collectives it over-counts.

On CUDA the caching allocator's own peak counter is used. The numbers are bytes *above* what was live
when the block started; ``baseline`` (modules, optimizers, tensors) adds what those objects held then.
"""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

TrackMethod = Literal["storages", "allocator"]


@dataclass
class PeakMemory:
    """What ``track_peak_memory`` measured; filled in when its block exits."""

    peak_bytes: int = 0  # highest live bytes above the start of the block
    end_bytes: int = 0  # live bytes above the start when the block ended (may be negative)
    baseline_bytes: int = 0  # bytes held by ``baseline`` objects when the block started

    @property
    def total_peak_bytes(self) -> int:
        """Peak including the baseline: what those objects and the block held at the highest point."""
        return self.baseline_bytes + self.peak_bytes


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's memory is its local shard


def live_tensor_bytes(objects: Iterable[Any]) -> int:
    """Bytes of the distinct storages held by tensors, modules (parameters, gradients, buffers) and optimizers."""
    seen: dict[tuple[str, int], int] = {}
    for t in _tensors_of(objects):
        storage = _local(t).untyped_storage()
        if storage.nbytes() and storage.data_ptr():
            seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def _tensors_of(objects: Iterable[Any]) -> Iterator[torch.Tensor]:
    for obj in objects:
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, nn.Module):
            for p in obj.parameters():
                yield p
                if p.grad is not None:
                    yield p.grad
            yield from obj.buffers()
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                yield from (v for v in state.values() if isinstance(v, torch.Tensor))
        elif isinstance(obj, dict | list | tuple):
            yield from _tensors_of(obj.values() if isinstance(obj, dict) else obj)


class StorageTracker(TorchDispatchMode):
    """Live bytes of CPU tensor storages, re-summed after every op (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._refs: dict[int, weakref.ref[torch.UntypedStorage]] = {}
        self._start: dict[int, int] = {}  # bytes each storage held when the block started (0 if new)
        self._freed_start = 0  # start bytes of storages that died during the block
        self._lock = threading.Lock()
        self.peak = 0

    def _track(self, t: Any, *, at_start: bool) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.is_meta or isinstance(t, FakeTensor):
            return
        try:
            storage = _local(t).untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
            return
        key = storage._cdata
        if key in self._refs:
            return
        with self._lock:
            self._refs[key] = weakref.ref(storage, partial(self._died, key))
            self._start[key] = storage.nbytes() if at_start else 0

    def _died(self, key: int, _ref: object = None) -> None:
        with self._lock:
            self._refs.pop(key, None)
            self._freed_start += self._start.pop(key, 0)

    def live(self) -> int:
        """Bytes above the start: current sizes of tracked storages minus what they held at the start."""
        with self._lock:
            items = list(self._refs.items())
            total = -self._freed_start
            starts = dict(self._start)
        for key, ref in items:
            storage = ref()
            if storage is not None:
                total += storage.nbytes() - starts.get(key, 0)
        return total

    def __enter__(self) -> StorageTracker:
        for obj in gc.get_objects():
            if issubclass(type(obj), torch.Tensor):  # type(): no __class__ lookups on lazy module proxies
                self._track(obj, at_start=True)
        super().__enter__()
        return self

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves((args, kwargs, out)):
            self._track(t, at_start=False)
        self.peak = max(self.peak, self.live())
        return out


def peak_of_events(events: Iterable[tuple[int, int, int]]) -> tuple[int, int]:
    """``(peak, end)`` of ``(time, address, +/- bytes)`` allocator events.

    An allocation at an address that is still live means its earlier block was freed unseen (by
    another thread): that block is dropped from the live sum first.
    """
    live = peak = 0
    blocks: dict[int, int] = {}
    for _, address, nbytes in sorted(events, key=lambda e: e[0]):
        if nbytes > 0:
            live -= blocks.pop(address, 0)
            blocks[address] = nbytes
        else:
            blocks.pop(address, None)
        live += nbytes
        peak = max(peak, live)
    return peak, live


def _allocator_events(prof: Any) -> list[tuple[int, int, int]]:
    """``(time, address, +/- bytes)`` of the CPU allocator events the profiler recorded."""
    found: list[tuple[int, int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        fields = node.extra_fields
        if str(node.tag).endswith("Allocation") and str(fields.device).startswith("cpu"):
            found.append((node.start_time_ns, int(fields.ptr), int(fields.alloc_size)))
    return found


@contextmanager
def track_peak_memory(
    *, baseline: Iterable[Any] = (), device: str | torch.device = "cpu", method: TrackMethod = "storages"
) -> Iterator[PeakMemory]:
    """Measure peak live tensor bytes of the enclosed block on ``device`` (see the module docstring)."""
    result = PeakMemory(baseline_bytes=live_tensor_bytes(baseline))
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        start = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        yield result
        torch.cuda.synchronize(dev)
        result.peak_bytes = torch.cuda.max_memory_allocated(dev) - start
        result.end_bytes = torch.cuda.memory_allocated(dev) - start
    elif method == "allocator":
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield result
        result.peak_bytes, result.end_bytes = peak_of_events(_allocator_events(prof))
    else:
        with StorageTracker() as tracker:
            yield result
        result.peak_bytes, result.end_bytes = max(tracker.peak, 0), tracker.live()
