"""The link between two nodes, measured by `plait profile --nnodes N`: node 0's ranks send to node 1's.

Local rank i of node 0 pairs with local rank i of node 1: it sends a message, and the peer answers with a
4-byte acknowledgement, so a call takes the message's one-way time (plus a tiny one's). First pair 0 alone
crosses the link (what one stream gets: the link's bandwidth), then every pair at once, all in the same
direction (what each rank gets while all ranks of a node send across it: the per-device bandwidth a cluster's
``inter_node`` link holds). A ping-pong would not do for the second: one pair's reply would overlap another
pair's message on the other direction's wire, and the pairs would seem to share less than they do.

Each sender records when each call started and ended on the machine's monotonic clock (the senders share
node 0's clock); a call of all pairs lasts from the first start to the last end, so ranks that leave the
barrier late (a busy machine) do not make the link look less shared than it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from plait.profiling.bench_comm import repeats_for
from plait.profiling.config import ProfileConfig
from plait.profiling.timing import Timer


@dataclass(frozen=True)
class LinkGroups:
    """The process groups of the link measurement: each pair, and all ranks of nodes 0 and 1 (for barriers)."""

    pairs: tuple[Any, ...]
    both_nodes: Any


def link_groups(cfg: ProfileConfig) -> LinkGroups | None:
    """The groups ``link_results`` needs (None on one node); every rank must call this, at the same point."""
    if cfg.nnodes < 2:
        return None
    pairs = tuple(dist.new_group([i, cfg.nproc + i]) for i in range(cfg.nproc))
    return LinkGroups(pairs=pairs, both_nodes=dist.new_group(list(range(2 * cfg.nproc))))


def _peer(rank: int, nproc: int) -> tuple[int, bool]:
    """The rank across the link and whether ``rank`` sends first (node 0's side does)."""
    return (rank + nproc, True) if rank < nproc else (rank - nproc, False)


def _send_acked(peer: int, first: bool, message: torch.Tensor, ack: torch.Tensor) -> None:
    """Node 0's side sends ``message`` and waits for the peer's ``ack``; node 1's side receives and acknowledges."""
    if first:
        dist.send(message, dst=peer)
        dist.recv(ack, src=peer)
    else:
        dist.recv(message, src=peer)
        dist.send(ack, dst=peer)


def _spans(fn: Callable[[], None], cfg: ProfileConfig, timer: Timer, group: Any, repeats: int) -> list[list[float]]:
    """``[start, end]`` on the monotonic clock of each of ``repeats`` calls, each started after a barrier."""
    for _ in range(max(1, cfg.warmup)):
        fn()
    timer.synchronize()
    spans = []
    for _ in range(repeats):
        dist.barrier(group=group)
        start = time.monotonic()
        fn()
        timer.synchronize()
        spans.append([start, time.monotonic()])
    return spans


def link_results(
    cfg: ProfileConfig, timer: Timer, device: torch.device, tick: Callable[[], None], groups: LinkGroups | None
) -> list[dict[str, Any]]:
    """The spans of this sender's calls per (pairs sending at once, message bytes); receivers and ranks off
    the link record nothing. ``groups`` comes from ``link_groups``; ``tick`` marks one finished table entry."""
    rank = dist.get_rank()
    rows: list[dict[str, Any]] = []
    if groups is None:
        return rows
    peer, first = _peer(rank, cfg.nproc)
    local = rank % cfg.nproc
    ack = torch.ones(1, device=device)
    for pairs in cfg.link_pairs:
        group = groups.pairs[0] if pairs == 1 else groups.both_nodes
        for nbytes in cfg.collective_bytes:
            if rank < 2 * cfg.nproc and local < pairs:
                message = torch.ones(max(1, nbytes // 4), device=device)

                def send(t: torch.Tensor = message) -> None:
                    _send_acked(peer, first, t, ack)

                spans = _spans(send, cfg, timer, group, repeats_for(nbytes, cfg))
                if first:
                    rows.append({"pairs": pairs, "nbytes": nbytes, "spans": spans})
            tick()
    return rows
