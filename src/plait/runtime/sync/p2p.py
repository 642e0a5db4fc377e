"""Counted point-to-point building blocks: a private process group, a ring all-reduce and an all-gather.

The synchronizers build their collectives from ``isend``/``irecv`` on a group of their own, so that (a) every
byte a rank moves is counted as the payload of a message it posted, and (b) a synchronizer may drive its group
from a background thread without interleaving with another synchronizer's messages. Peers are addressed by
their position in the group (``group_peer``), never by global rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from plait.runtime.sync.counter import ByteCounter


def private_group(group: dist.ProcessGroup | None = None) -> dist.ProcessGroup:
    """A new process group over the ranks of ``group`` (the world when None); only its members must call this.

    Members must create their groups in the same order. Such a group is not destroyed before the world's
    teardown: torch names a locally synchronised group after its ranks and the number of live groups, so
    destroying one would let the next group reuse the name, and meet the stale rendezvous of the old one.
    """
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    new = dist.new_group(ranks=ranks, use_local_synchronization=True)
    assert isinstance(new, dist.ProcessGroup)
    return new


def nbytes(t: torch.Tensor) -> int:
    """Payload bytes of a tensor."""
    return t.numel() * t.element_size()


def exchange(
    group: dist.ProcessGroup,
    sends: list[tuple[int, torch.Tensor]],
    recvs: list[tuple[int, torch.Tensor]],
    counter: ByteCounter | None = None,
    step: int = 0,
) -> None:
    """Post every send ``(peer, tensor)`` and receive ``(peer, buffer)`` at once, wait for all, count the bytes."""
    ops = [dist.P2POp(dist.isend, t, group=group, group_peer=peer) for peer, t in sends if t.numel()]
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=peer) for peer, t in recvs if t.numel()]
    if not ops:
        return
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    if counter is not None:
        counter.add(step, sent=sum(nbytes(t) for _, t in sends), recv=sum(nbytes(t) for _, t in recvs))


def ring_all_reduce(flat: torch.Tensor, group: dist.ProcessGroup, counter: ByteCounter | None = None, step: int = 0) -> None:
    """Sum a 1-D contiguous tensor over ``group`` in place: ring reduce-scatter, then ring all-gather.

    The tensor is cut into n chunks (``tensor_split``); each rank sends n-1 chunks in each phase, so it sends and
    receives 2(n-1)/n of the bytes when n divides the length. Every rank ends with the same bits.
    """
    n, me = group.size(), group.rank()
    if n == 1:
        return
    assert flat.dim() == 1 and flat.is_contiguous(), "ring_all_reduce takes a flat contiguous tensor"
    chunks = list(flat.tensor_split(n))
    scratch = torch.empty(max(c.numel() for c in chunks), dtype=flat.dtype, device=flat.device)
    right, left = (me + 1) % n, (me - 1) % n
    for s in range(n - 1):  # reduce-scatter: afterwards chunk (me + 1) % n holds the full sum
        into = chunks[(me - s - 1) % n]
        buf = scratch[: into.numel()]
        exchange(group, [(right, chunks[(me - s) % n])], [(left, buf)], counter, step)
        into.add_(buf)
    for s in range(n - 1):  # all-gather the summed chunks around the ring
        exchange(group, [(right, chunks[(me + 1 - s) % n])], [(left, chunks[(me - s) % n])], counter, step)


def all_gather_flat(mine: torch.Tensor, group: dist.ProcessGroup, counter: ByteCounter | None = None,
                    step: int = 0) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped tensor, by group position: ``mine`` goes to each of the n-1 peers."""
    n, me = group.size(), group.rank()
    mine = mine.contiguous()
    out = [mine if r == me else torch.empty_like(mine) for r in range(n)]
    peers = [r for r in range(n) if r != me]
    exchange(group, [(r, mine) for r in peers], [(r, out[r]) for r in peers], counter, step)
    return out
