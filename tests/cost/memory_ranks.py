"""Measure the peak tensor memory of data-parallel steps on 2 real gloo ranks; prints JSON lines.

``python memory_ranks.py MODEL BATCH`` runs, for each of replicate (plait's WFBP buckets) and fsdp
(FSDP2 ``fully_shard`` per layer, reshard after forward), three AdamW steps and measures the third with
``track_peak_memory``. Rank 0 prints ``{"kind", "total_peak_bytes"}``.
"""

from __future__ import annotations

import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard

from plait.graph import capture
from plait.models.zoo import zoo_model
from plait.profiling.memory import track_peak_memory
from plait.runtime.wfbp import WaitFreeReplicate


def _step(kind: str, name: str, batch_size: int) -> int:
    zm = zoo_model(name)
    torch.manual_seed(0)
    model = zm.build()
    batch = zm.make_batch(batch_size)
    if kind == "replicate":
        names = [n for n, _ in model.named_parameters()]
        dp = WaitFreeReplicate(model, [list(reversed(names))])
        zero = dp.zero_grad
    else:
        graph = capture(model, zm.make_batch(batch_size, device="meta"), loss_fn=zm.loss, with_ops=False)
        for layer in graph.layers:
            if layer.param_bytes:
                fully_shard(model.get_submodule(layer.name), reshard_after_forward=True)
        fully_shard(model, reshard_after_forward=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if kind != "replicate":

        def zero() -> None:
            opt.zero_grad(set_to_none=True)

    def step() -> None:
        zero()
        zm.loss(model, batch).backward()
        opt.step()

    step()
    step()
    with track_peak_memory(baseline=[model, opt]) as mem:
        step()
    return mem.total_peak_bytes


def _rank(rank: int, port: int, name: str, batch_size: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for kind in ("replicate", "fsdp"):
        peak = _step(kind, name, batch_size)
        if rank == 0:
            print(json.dumps({"kind": kind, "total_peak_bytes": peak}), flush=True)
    dist.destroy_process_group()


def main() -> None:
    """Run both kinds on 2 forked ranks."""
    name, batch_size = sys.argv[1], int(sys.argv[2])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(port, name, batch_size), nprocs=2, start_method="fork")


if __name__ == "__main__":
    main()
