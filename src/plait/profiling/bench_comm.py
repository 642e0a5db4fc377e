"""Collective benchmarks among the ranks of one `plait profile` run (gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from plait.profiling.config import ProfileConfig
from plait.profiling.timing import Timer

GROUP_OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")
MIN_REPEATS = 5  # collectives wait on every rank being scheduled: more repeats than compute needs
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def repeats_for(nbytes: int, cfg: ProfileConfig) -> int:
    """Timed calls of one message size: many for small (latency-bound, heavy-tailed) messages."""
    if nbytes <= 64 * 1024:
        return max(100, cfg.repeats)
    return max(12 if nbytes <= 1024 * 1024 else MIN_REPEATS, cfg.repeats)


def _op_call(op: str, nbytes: int, group: Any, size: int, device: torch.device) -> Callable[[], Any]:
    """One collective of ``nbytes`` (full tensor size) on ``group``, as a callable."""
    numel = max(size, nbytes // 4 // size * size)  # float32, divisible by the group size
    full = torch.ones(numel, device=device)
    shard = torch.ones(numel // size, device=device)
    if op == "all_reduce":
        return lambda: dist.all_reduce(full, group=group)
    if op == "all_gather":
        return lambda: _all_gather(full, shard, group=group)
    if op == "reduce_scatter":
        return lambda: _reduce_scatter(shard, full, group=group)
    if op == "broadcast":
        src = dist.get_global_rank(group, 0) if group is not None else 0
        return lambda: dist.broadcast(full, src=src, group=group)
    raise ValueError(f"unknown collective {op!r}")


def _timed(fn: Callable[[], Any], cfg: ProfileConfig, timer: Timer, group: Any, repeats: int) -> float:
    """Mean seconds of one call, each started together after a barrier.

    The mean, not the median: a rank waiting in a collective sleeps, and on a busy (or virtual) machine
    its wake-up now and then costs a scheduler slice; training pays that tail on every collective.
    """
    for _ in range(max(1, cfg.warmup)):
        fn()
    timer.synchronize()
    samples = []
    for _ in range(repeats):
        dist.barrier(group=group)
        samples.append(timer.elapsed(fn, 1))
    return statistics.fmean(samples)


def _ping_pong(rank: int, t: torch.Tensor) -> None:
    if rank == 0:
        dist.send(t, dst=1)
        dist.recv(t, src=1)
    else:
        dist.recv(t, src=0)
        dist.send(t, dst=0)


def _ring_step(group: Any, size: int, send: torch.Tensor, recv: torch.Tensor) -> None:
    """Every rank of ``group`` sends ``send`` to the next rank and receives ``recv`` from the previous, at once."""
    me = dist.get_rank(group)
    ops = [dist.P2POp(dist.isend, send, group=group, group_peer=(me + 1) % size),
           dist.P2POp(dist.irecv, recv, group=group, group_peer=(me - 1) % size)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()


def process_groups(cfg: ProfileConfig) -> dict[int, Any]:
    """The groups of ranks 0..n-1 for n = 2..nproc; every rank must call this, at the same point."""
    return {n: dist.new_group(list(range(n))) for n in range(2, cfg.nproc + 1)}


def collective_results(
    cfg: ProfileConfig, timer: Timer, device: torch.device, tick: Callable[[], None], groups: Mapping[int, Any]
) -> list[dict[str, Any]]:
    """This rank's mean time of one call per (op, group size, bytes); the profile keeps the slowest rank's.

    ``groups`` comes from ``process_groups``; ranks outside a group skip its measurements. ``tick`` marks
    one finished table entry (rank 0 reports it).
    """
    rank = dist.get_rank()
    rows: list[dict[str, Any]] = []
    for n, group in groups.items():
        for op in GROUP_OPS:
            for nbytes in cfg.collective_bytes:
                if rank < n:
                    fn = _op_call(op, nbytes, group, n, device)
                    seconds = _timed(fn, cfg, timer, group, repeats_for(nbytes, cfg))
                    rows.append({"op": op, "group_size": n, "nbytes": nbytes, "seconds": seconds})
                tick()
    if cfg.nproc >= 2:
        for nbytes in cfg.collective_bytes:
            if rank < 2:
                message = torch.ones(max(1, nbytes // 4), device=device)

                def ping_pong(t: torch.Tensor = message) -> None:
                    _ping_pong(rank, t)

                round_trip = _timed(ping_pong, cfg, timer, groups[2], repeats_for(nbytes, cfg))
                rows.append({"op": "p2p", "group_size": 2, "nbytes": nbytes, "seconds": round_trip / 2})
            tick()
    for n, group in groups.items():  # a ring step: all n ranks move a message at once (plait's own ring all-reduce)
        for nbytes in cfg.collective_bytes:
            if rank < n:
                send, recv = (torch.ones(max(1, nbytes // 4), device=device) for _ in range(2))
                fn = partial(_ring_step, group, n, send, recv)
                rows.append({"op": "ring_step", "group_size": n, "nbytes": nbytes,
                             "seconds": _timed(fn, cfg, timer, group, repeats_for(nbytes, cfg))})
            tick()
    return rows


SYNC_BURST_FLOPS = 2e8  # a compute burst of about one small layer (a few ms on one core)
SYNC_REPEATS = 40


def _burst(device: torch.device) -> Callable[[], Any]:
    a = torch.randn(256, 256, device=device)
    calls = max(1, int(SYNC_BURST_FLOPS / (2 * 256**3)))

    def burst() -> None:
        for _ in range(calls):
            torch.mm(a, a)

    return burst


def sync_results(
    cfg: ProfileConfig, timer: Timer, device: torch.device, tick: Callable[[], None], groups: Mapping[int, Any]
) -> list[dict[str, Any]]:
    """Per group size (``groups`` from ``process_groups``): mean time of (compute burst + tiny all_reduce)
    minus the burst alone and the tiny all_reduce alone (started together after a barrier) -- what
    blocking on a collective in the middle of compute costs on CPU ranks that share cores (waiting for
    the slowest rank, waking up)."""
    rank = dist.get_rank()
    rows: list[dict[str, Any]] = []
    burst = _burst(device)
    for n, group in groups.items():
        if rank < n:
            flag = torch.ones(1, device=device)
            reduce_alone = _timed(lambda: dist.all_reduce(flag, group=group), cfg, timer, group, SYNC_REPEATS)  # noqa: B023
            burst_alone = _timed(burst, cfg, timer, group, SYNC_REPEATS)

            def burst_then_reduce() -> None:
                burst()
                dist.all_reduce(flag, group=group)  # noqa: B023

            both = _timed(burst_then_reduce, cfg, timer, group, SYNC_REPEATS)
            rows.append({"group_size": n, "seconds": max(0.0, both - burst_alone - reduce_alone)})
        tick()
    return rows
