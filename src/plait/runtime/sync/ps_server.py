"""The server half of a co-located parameter server: a rank's shards, their optimizer, and two threads.

A worker's clock is the number of gradients it has pushed. Every push from worker w carries its next clock
implicitly (pushes from one worker arrive in order). The server keeps the pushes of each clock until all n
workers' are in, then averages them (summed in worker order, so the result does not depend on arrival
order), runs the optimizer on its shards once, and advances its version (the number of clocks applied, i.e.
the minimum worker clock it has fully seen).

After the push of clock c from worker w, w's next iteration is iteration c + 1, which SSP lets start once the
slowest worker has reached clock c + 1 - s. The server answers w with its shards as soon as its version is at
least c + 1 - s; with s = 0 that is after every worker's clock-c push (bulk-synchronous), with s > 0 a fast
worker runs at most s clocks ahead of the slowest. Replies may include newer updates than required (SSP).

Threads: a receiver blocks in ``recv`` from any source on the push group and queues each message; the server
thread takes messages from that queue (and the co-located worker's pushes, handed over in memory), applies
clocks and sends replies on the pull group. Only these two threads touch the server's state and groups.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from plait.errors import PlaitError
from plait.runtime.sync.counter import ByteCounter
from plait.runtime.sync.p2p import nbytes

OptimizerFn = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
MAX_LOG = 4096


@dataclass(frozen=True)
class Reply:
    """A server answered ``worker``'s push of clock ``clock`` with shards at ``version`` (clocks applied)."""

    worker: int
    clock: int
    version: int


class ShardServer:
    """Owns this rank's shards, applies each complete clock with its optimizer and answers workers under SSP."""

    def __init__(self, *, shards: Sequence[torch.Tensor], optimizer_fn: OptimizerFn, staleness: int,
                 push_group: dist.ProcessGroup, pull_group: dist.ProcessGroup, counter: ByteCounter) -> None:
        self.params = [nn.Parameter(t.detach().clone().contiguous()) for t in shards]
        self.optimizer = optimizer_fn(self.params)
        self.staleness = staleness
        self.push_group, self.pull_group = push_group, pull_group
        self.size, self.me = push_group.size(), push_group.rank()
        self.numel = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.counter = counter
        self.clocks = [0] * self.size  # pushes received per worker
        self.version = 0  # clocks applied
        self.log: collections.deque[Reply] = collections.deque(maxlen=MAX_LOG)
        self._pending: dict[int, dict[int, torch.Tensor]] = {}  # clock -> worker -> pushed gradient
        self._waiting: dict[int, int] = {}  # worker -> clock of the push it awaits an answer to
        self._inbox: queue.Queue[tuple[int, torch.Tensor] | None] = queue.Queue()
        self._local: queue.Queue[torch.Tensor | BaseException] = queue.Queue()
        self._closing = False
        self.error: BaseException | None = None
        self._threads = [threading.Thread(target=self._serve, name="plait-ps-server", daemon=True)]
        if self.size > 1:
            self._threads.append(threading.Thread(target=self._receive, name="plait-ps-receiver", daemon=True))
        for thread in self._threads:
            thread.start()

    # ---- called by the co-located worker (main thread) ----------------------------------------

    def push_local(self, grad: torch.Tensor) -> None:
        """The co-located worker's push, handed over in memory (no bytes on the network)."""
        self._inbox.put((self.me, grad))

    def local_reply(self, timeout_s: float) -> torch.Tensor:
        """Block until the server answers the co-located worker's last push; its shards, flat."""
        try:
            item = self._local.get(timeout=timeout_s)
        except queue.Empty:
            raise PlaitError(f"parameter server: no answer within {timeout_s:.0f} s; a worker stopped pushing") from None
        if isinstance(item, BaseException):
            raise PlaitError(f"parameter server thread failed: {item}") from item
        return item

    def snapshot(self) -> torch.Tensor:
        """The shards now, flat (call only while no push is in flight, e.g. between the close barriers)."""
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def begin_close(self) -> None:
        """From now on every message the receiver gets is a stop message (call after every push was answered)."""
        self._closing = True
        if self.size == 1:
            self._inbox.put(None)

    def join(self, timeout_s: float) -> None:
        """Wait for both threads to end (after every remote worker sent its stop message)."""
        for thread in self._threads:
            thread.join(timeout_s)
        if self.error is not None:
            raise PlaitError(f"parameter server thread failed: {self.error}") from self.error

    # ---- threads --------------------------------------------------------------------------------

    def _receive(self) -> None:
        stops = 0
        try:
            while stops < self.size - 1:
                buf = torch.empty(self.numel, dtype=self.dtype)
                src = dist.recv(buf, group=self.push_group)
                if self._closing:
                    stops += 1
                else:
                    self._inbox.put((dist.get_group_rank(self.push_group, src), buf))
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._inbox.put(None)

    def _serve(self) -> None:
        try:
            while (item := self._inbox.get()) is not None:
                self._accept(*item)
        except BaseException as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self.error = self.error or exc
        self._local.put(exc)

    def _accept(self, worker: int, grad: torch.Tensor) -> None:
        clock = self.clocks[worker]
        self.clocks[worker] += 1
        if worker != self.me:
            self.counter.add(clock, recv=nbytes(grad))
        self._pending.setdefault(clock, {})[worker] = grad
        self._waiting[worker] = clock
        while len(self._pending.get(self.version, ())) == self.size:
            self._apply(self._pending.pop(self.version))
        self._answer()

    def _apply(self, pushes: dict[int, torch.Tensor]) -> None:
        """One optimizer step on the mean of every worker's push of one clock (summed in worker order)."""
        total = pushes[0].clone()
        for worker in range(1, self.size):
            total += pushes[worker]
        total /= self.size
        offset = 0
        for p in self.params:
            p.grad = total[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        self.optimizer.step()
        self.version += 1

    def _answer(self) -> None:
        """Send the shards to every waiting worker that SSP now lets start its next iteration."""
        for worker, clock in list(self._waiting.items()):
            if self.version < clock + 1 - self.staleness:
                continue
            del self._waiting[worker]
            self.log.append(Reply(worker, clock, self.version))
            flat = self.snapshot()
            if worker == self.me:
                self._local.put(flat)
                continue
            work = dist.isend(flat, group=self.pull_group, group_dst=worker)
            assert work is not None
            work.wait()
            self.counter.add(clock, sent=nbytes(flat))
