"""The noise-scale estimator on real gloo ranks: replicated (2 and 4 ranks), FSDP-like sharded gradients with
per-micro-batch local norms (2 ranks), and a dp x tp mesh whose ranks hold DTensor shards (2 x 2).

Every rank computes its own local gradients of the linear-regression problem, synchronises them the way
the runtime does (all-reduce of a flat buffer; reduce-scatter; all-reduce over the dp group of tp shards)
and feeds ``GradNormProbe``; the combined norms are the same on every rank. Rank 0's per-step estimates
must be unbiased and the smoothed noise scale within 10 % of the exact value.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from gns_problem import DIM, LinearProblem, loss, make_problem
from test_gns_estimator import assert_unbiased
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from plait.adaptive import GradNoiseScale, GradNormProbe, GradStats, NormSample, estimate, squared_norm
from plait.errors import PlaitError
from plait.runtime import init_distributed, run_ranks, teardown

GLOBAL = 128
NUM_MICRO = 2  # the FSDP-like case's accumulation steps


def _fresh() -> tuple[GradNormProbe, GradNoiseScale, list[GradStats]]:
    return GradNormProbe(), GradNoiseScale(GLOBAL), []


def _record(gns: GradNoiseScale, raw: list[GradStats], sample: NormSample) -> None:
    gns.update(sample)
    raw.append(estimate(sample))


def _result(gns: GradNoiseScale, raw: list[GradStats], **extra: Any) -> dict[str, Any]:
    return {"noise_scale": gns.noise_scale, "raw": [(s.sqr, s.trace) for s in raw], **extra}


def _local_grad(problem: LinearProblem, gen: torch.Generator, size: int, divide: int = 1) -> torch.Tensor:
    w = nn.Parameter(problem.w.clone())
    (loss(w, *problem.batch(gen, size)) / divide).backward()
    assert w.grad is not None
    return w.grad


def replicate_case(problem: LinearProblem, steps: int, seed: int) -> dict[str, Any]:
    """WFBP: each rank's flat gradient buffer is normed before its all-reduce and after."""
    rank, world = dist.get_rank(), dist.get_world_size()
    local = GLOBAL // world
    gen = torch.Generator().manual_seed(seed * 100 + rank)
    probe, gns, raw = _fresh()
    for _ in range(steps):
        buffer = _local_grad(problem, gen, local)
        probe.add_local([buffer])
        buffer.div_(world)
        dist.all_reduce(buffer)
        probe.add_synced([buffer])
        _record(gns, raw, probe.sample(small_batch=local, big_batch=GLOBAL, num_local=world, synced_copies=world))
    return _result(gns, raw)


def fsdp_case(problem: LinearProblem, steps: int, seed: int) -> dict[str, Any]:
    """FSDP2-like: every micro-batch's padded flat gradient (the reduce-scatter input) is normed, and each rank
    norms only its shard of the synchronised gradient."""
    rank, world = dist.get_rank(), dist.get_world_size()
    micro = GLOBAL // (world * NUM_MICRO)
    pad = -DIM % world
    gen = torch.Generator().manual_seed(seed * 100 + rank)
    probe, gns, raw = _fresh()
    for _ in range(steps):
        shard = torch.zeros((DIM + pad) // world, dtype=torch.float64)
        for _ in range(NUM_MICRO):
            flat = F.pad(_local_grad(problem, gen, micro, divide=NUM_MICRO), (0, pad))
            probe.add_local([flat], scale=NUM_MICRO)
            dist.all_reduce(flat)  # a reduce-scatter (average), written as all-reduce + own chunk
            shard += flat.chunk(world)[rank] / world
        probe.add_synced([shard])
        sample = probe.sample(small_batch=micro, big_batch=GLOBAL, num_local=world * NUM_MICRO, synced_copies=1)
        _record(gns, raw, sample)
    return _result(gns, raw)


def _tp_pieces(mine: torch.Tensor, mesh: Any) -> list[DTensor]:
    """A rank's flat [weight shard, bias] as DTensors: the weight sharded over tp, the bias replicated."""
    return [DTensor.from_local(mine[:-1], mesh, [Shard(0)], run_check=False, shape=torch.Size([DIM - 1]), stride=(1,)),
            DTensor.from_local(mine[-1:], mesh, [Replicate()], run_check=False)]


def _refuses_partial(mesh: Any) -> bool:
    """True when the norm of a gradient still pending a Partial sum raises PlaitError."""
    pending = DTensor.from_local(torch.ones(3, dtype=torch.float64), mesh, [Partial()], run_check=False)
    try:
        squared_norm([pending])
    except PlaitError:
        return True
    return False


def tensor_parallel_case(problem: LinearProblem, steps: int, seed: int) -> dict[str, Any]:
    """A 2 x 2 (dp, tp) mesh: tp ranks hold weight shards and a replicated bias; dp replicas see different data."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp_index, tp_index = mesh.get_coordinate() or (0, 0)
    dp_group, tp_mesh = mesh["dp"].get_group(), mesh["tp"]
    local = GLOBAL // 2
    gen = torch.Generator().manual_seed(seed * 100 + dp_index)  # the tp ranks of a replica share its batch
    probe, gns, raw = _fresh()
    first: dict[str, float] = {}
    for step in range(steps):
        grad = _local_grad(problem, gen, local)
        mine = torch.cat([grad[: DIM - 1].chunk(2)[tp_index], grad[DIM - 1 :]])  # this rank's pieces, flat
        probe.add_local(_tp_pieces(mine, tp_mesh))
        dist.all_reduce(mine, group=dp_group)
        probe.add_synced(_tp_pieces(mine.div_(2), tp_mesh))
        if step == 0:  # checked exactly against whole-vector norms by the test
            pair = probe.combine(num_local=2, synced_copies=2)
            first = {"pair_local": float(pair[0]), "pair_synced": float(pair[1]), "partial_refused": _refuses_partial(tp_mesh)}
            continue
        _record(gns, raw, probe.sample(small_batch=local, big_batch=GLOBAL, num_local=2, synced_copies=2))
    return _result(gns, raw, **first)


def run_cases(cases: list[tuple[str, int, int]]) -> dict[str, Any]:
    """One rank: run each (case, steps, seed) in turn on the same process group."""
    init_distributed()
    funcs = {"replicate": replicate_case, "fsdp": fsdp_case, "tp": tensor_parallel_case}
    problem = make_problem()
    out = {name: funcs[name](problem, steps, seed) for name, steps, seed in cases}
    teardown()
    return out


def _check(result: dict[str, Any], truth: GradStats) -> None:
    raw = [GradStats(sqr=s, trace=t) for s, t in result["raw"]]
    assert_unbiased(raw, truth)
    assert result["noise_scale"] == pytest.approx(truth.noise_scale, rel=0.10)


def test_two_ranks_replicated_and_fsdp_sharded() -> None:
    truth = make_problem().truth()
    results = run_ranks(run_cases, 2, [("replicate", 500, 1), ("fsdp", 400, 2)], timeout_s=120)
    for case in ("replicate", "fsdp"):
        same = torch.tensor(results[1][case]["raw"]), torch.tensor(results[0][case]["raw"])
        torch.testing.assert_close(*same, rtol=1e-12, atol=0)  # every rank sees the same numbers
        _check(results[0][case], truth)


def test_four_ranks_replicated_and_tensor_parallel_shards() -> None:
    truth = make_problem().truth()
    results = run_ranks(run_cases, 4, [("replicate", 300, 3), ("tp", 400, 4)], timeout_s=180)
    for case in ("replicate", "tp"):
        _check(results[0][case], truth)
    # the shards' partial norms add up to whole-vector norms: the replicated bias is counted once
    problem = make_problem()
    gens = [torch.Generator().manual_seed(4 * 100 + dp) for dp in range(2)]
    grads = [_local_grad(problem, g, GLOBAL // 2) for g in gens]
    synced = (grads[0] + grads[1]) / 2
    tp = results[0]["tp"]
    assert tp["pair_local"] == pytest.approx(float(sum(g @ g for g in grads)) / 2, rel=1e-12)
    assert tp["pair_synced"] == pytest.approx(float(synced @ synced), rel=1e-12)
    assert tp["partial_refused"]
