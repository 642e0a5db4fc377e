"""CollectiveCounter sees every kind of collective (c10d calls, DTensor's functional ones, FSDP2's, WFBP's),
names the mesh axes of each group, measures bytes and tells forward from backward."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from plait.runtime import init_distributed, run_ranks, teardown
from plait.runtime.collectives import CollectiveCounter
from plait.runtime.wfbp import WaitFreeReplicate

AR, AG, RS, A2A, BC = "all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast"
DP, TP, BOTH = ("dp",), ("tp",), ("dp", "tp")


def counter_rank() -> dict[str, Any]:
    init_distributed()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp, tp = mesh.get_group("dp"), mesh.get_group("tp")
    out: dict[str, Any] = {}
    t = torch.ones(8)
    with CollectiveCounter(mesh) as calls:
        dist.all_reduce(t, group=dp)
        dist.all_gather_into_tensor(torch.empty(16), t, group=tp)
        dist.reduce_scatter_tensor(torch.empty(4), t, group=tp)
        dist.all_to_all_single(torch.empty(8), t)
        dist.broadcast(t, src=dist.get_global_rank(dp, 0), group=dp)
        funcol.all_reduce(t, "sum", (mesh, 1)).wait()
        funcol.all_gather_tensor(t, 0, (mesh, 0)).wait()
    out["calls"] = [(e.kind, e.axes, e.bytes, e.phase) for e in calls.events]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    with CollectiveCounter(mesh) as construct:
        sync = WaitFreeReplicate(model, [["2.bias", "2.weight"], ["0.bias", "0.weight"]], group=dp)
    with CollectiveCounter(mesh) as step:
        model(torch.randn(3, 4)).sum().backward()
    out["wfbp"] = (
        dict(construct.counts),
        dict(step.by_phase("forward")),
        dict(step.by_phase("backward")),
        sync.num_launches,
    )

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    fully_shard(model[0], mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    with CollectiveCounter(mesh) as fsdp:
        model(torch.randn(3, 4)).sum().backward()
    out["fsdp"] = (dict(fsdp.by_phase("forward")), dict(fsdp.by_phase("backward")), dict(fsdp.bytes_by_key()))
    dist.barrier()
    teardown()
    return out


def test_counts_every_source_with_axes_bytes_and_phase() -> None:
    for out in run_ranks(counter_rank, 4, timeout_s=120):
        assert out["calls"] == [
            (AR, DP, 32, "forward"),
            (AG, TP, 64, "forward"),  # the larger buffer: the gathered tensor
            (RS, TP, 32, "forward"),
            (A2A, BOTH, 32, "forward"),
            (BC, DP, 32, "forward"),
            (AR, TP, 32, "forward"),  # DTensor's functional collectives
            (AG, DP, 64, "forward"),
        ]
        construct, forward, backward, launches = out["wfbp"]
        assert construct == {(BC, DP): 2}  # one broadcast per bucket from dp rank 0
        assert (
            forward == {} and backward == {(AR, DP): 2} and launches == 2
        )  # one all-reduce per bucket, in backward
        fsdp_forward, fsdp_backward, fsdp_bytes = out["fsdp"]
        assert fsdp_forward == {(AG, DP): 2}  # the inner unit and the root
        assert fsdp_backward == {(AG, DP): 1, (RS, DP): 2}  # the inner unit again (resharded after forward)
        assert fsdp_bytes[(RS, DP)] == 4 * (8 * 4 + 8 + 2 * 8 + 2)  # every gradient, fp32, once
        assert Counter(fsdp_forward) + Counter(fsdp_backward) == Counter({(AG, DP): 3, (RS, DP): 2})
