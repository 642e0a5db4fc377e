"""Parameter-server synchronizer (GeePS-style sharded, co-located servers; SSP bounded staleness).

Every rank of the group is a worker; the ranks named by the parameters' SyncSpecs also serve shards
(``ps_layout``). Per step, ``finish()`` on a worker:

1. pushes its gradient shards: one message per server holding every shard that server owns (the co-located
   server gets its shards in memory);
2. waits for each server's answer: the server's current shards, sent once SSP allows (``ps_server``);
3. copies the answers into the model's parameters.

The servers run the optimizer (``optimizer_fn`` over their shards), so the caller's optimizer must leave these
parameters out (``updates_parameters`` is True). With staleness 0 a step equals an all-reduce step followed by
the optimizer; with s > 0 a worker starts iteration c only once every worker has pushed clock c - s - 1.

``close()`` is collective: after the last step every rank pulls the final shards (so all replicas agree even
when s > 0), then stops the server threads. Per-step bytes are the pushes and answers that cross the network;
the final pull and the stop messages are not counted.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from plait.errors import PlaitError
from plait.plan.ir import SyncSpec
from plait.runtime.context import dist_timeout_s
from plait.runtime.sync.counter import ByteCounter
from plait.runtime.sync.p2p import exchange, nbytes, private_group
from plait.runtime.sync.ps_layout import ShardKey, check_spec, pack, server_layouts, shard_of, unpack_into
from plait.runtime.sync.ps_server import MAX_LOG, OptimizerFn, Reply, ShardServer


class ParameterServerSync:
    """Workers push gradient shards to co-located servers, which apply the optimizer; workers pull fresh shards."""

    kind = "ps"
    updates_parameters = True  # the servers step these parameters; keep them out of the caller's optimizer

    def __init__(
        self,
        named_params: Sequence[tuple[str, nn.Parameter]],
        specs: Mapping[str, SyncSpec],
        *,
        optimizer_fn: OptimizerFn,
        group: dist.ProcessGroup | None = None,
        name: str = "ps",
        broadcast_from: int | None = 0,
    ) -> None:
        self.name = name
        self.params = dict(named_params)
        self.names = list(self.params)
        self.specs = {n: specs[n] for n in self.names}
        self.staleness = _one_staleness(self.specs)
        self.push_group, self.pull_group, self.ctrl_group = (private_group(group) for _ in range(3))
        self.size, self.me = self.ctrl_group.size(), self.ctrl_group.rank()
        for n, p in self.params.items():
            check_spec(n, p.shape, self.specs[n], self.size)
        self.layouts: dict[int, list[ShardKey]] = server_layouts(self.names, self.specs, self.size)
        self.counter = ByteCounter()
        self.clock = 0  # steps pushed by this worker
        self.timeout_s = dist_timeout_s()
        if broadcast_from is not None:
            self._broadcast(broadcast_from)
        mine = self.layouts.get(self.me, [])
        self.server = ShardServer(
            shards=[shard_of(self.params[n].detach(), self.specs[n], i) for n, i in mine], optimizer_fn=optimizer_fn,
            staleness=self.staleness, push_group=self.push_group, pull_group=self.pull_group, counter=self.counter,
        ) if mine else None

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of the parameters served."""
        return tuple(self.names)

    @property
    def replies(self) -> collections.deque[Reply]:
        """This rank's server log: which worker's push of which clock it answered at which version."""
        return self.server.log if self.server is not None else collections.deque(maxlen=MAX_LOG)

    def finish(self) -> None:
        """Push this step's gradient shards, wait for the servers' answers, write them into the parameters."""
        step = self.clock
        grads = {n: p.grad for n, p in self.params.items()}
        sends, recvs = [], []
        for server, layout in self.layouts.items():
            flat = pack(grads, self.params, self.specs, layout)
            if server == self.me:
                assert self.server is not None
                self.server.push_local(flat)
            else:
                sends.append((server, flat))
                recvs.append((server, torch.empty_like(flat)))
        works = [dist.isend(t, group=self.push_group, group_dst=s) for s, t in sends]
        works += [dist.irecv(t, group=self.pull_group, group_src=s) for s, t in recvs]
        for work in works:
            assert work is not None
            work.wait()
        self.counter.add(step, sent=sum(nbytes(t) for _, t in sends), recv=sum(nbytes(t) for _, t in recvs))
        answers = dict(recvs)
        if self.server is not None:
            answers[self.me] = self.server.local_reply(self.timeout_s)
        data = {n: p.data for n, p in self.params.items()}
        for server, layout in self.layouts.items():
            unpack_into(answers[server], data, self.specs, layout)
        self.clock += 1

    def close(self) -> None:
        """Collective: pull the final shards on every rank, then stop the server threads."""
        dist.barrier(group=self.ctrl_group)  # every push of every worker has been answered, so applied
        self._final_pull()
        if self.server is not None:
            self.server.begin_close()
        dist.barrier(group=self.ctrl_group)  # every server now takes what it receives as a stop message
        for server, layout in self.layouts.items():
            if server != self.me:
                dist.send(self._message_buffer(layout).zero_(), group=self.push_group, group_dst=server)
        if self.server is not None:
            self.server.join(self.timeout_s)

    def _final_pull(self) -> None:
        """Every server sends its shards to every other rank; every rank copies them into its parameters."""
        snapshot = self.server.snapshot() if self.server is not None else None
        sends = [(w, snapshot) for w in range(self.size) if w != self.me] if snapshot is not None else []
        recvs = [(s, self._message_buffer(layout)) for s, layout in self.layouts.items() if s != self.me]
        exchange(self.pull_group, sends, recvs)
        answers = dict(recvs)
        if snapshot is not None:
            answers[self.me] = snapshot
        data = {n: p.data for n, p in self.params.items()}
        for server, layout in self.layouts.items():
            unpack_into(answers[server], data, self.specs, layout)

    def _message_buffer(self, layout: Sequence[ShardKey]) -> torch.Tensor:
        """An empty flat tensor the size of one server's message."""
        numel = sum(shard_of(self.params[n], self.specs[n], i).numel() for n, i in layout)
        return torch.empty(numel, dtype=self.params[layout[0][0]].dtype)

    def _broadcast(self, src: int) -> None:
        """Start every worker (and so every server) from group position ``src``'s parameters."""
        with torch.no_grad():
            for p in self.params.values():
                dist.broadcast(p.data, group=self.ctrl_group, group_src=src)


def _one_staleness(specs: Mapping[str, SyncSpec]) -> int:
    """The staleness bound shared by every parameter of one server set."""
    bounds = {s.staleness for s in specs.values()}
    if len(bounds) > 1:
        raise PlaitError(f"one parameter-server synchronizer serves one staleness bound, got {sorted(bounds)}; "
                         "build one synchronizer per bound")
    if any(s.kind != "ps" for s in specs.values()):
        raise PlaitError("ParameterServerSync serves SyncSpecs of kind 'ps' only")
    return bounds.pop() if bounds else 0
