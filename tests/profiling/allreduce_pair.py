"""An independent 2-rank gloo all_reduce timing: ``python allreduce_pair.py NBYTES`` prints seconds.

Each rank times 40 all_reduces (a barrier before each) after 3 warm-up calls; the slower rank's
mean is printed by rank 0 (the statistic the profile records for collectives).
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, port: int, nbytes: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x = torch.ones(nbytes // 4)
    for _ in range(3):
        dist.all_reduce(x)
    samples = []
    for _ in range(40):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(x)
        samples.append(time.perf_counter() - start)
    mean = torch.tensor([statistics.fmean(samples)], dtype=torch.float64)
    dist.all_reduce(mean, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(float(mean), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    mp.start_processes(_rank, args=(free_port, int(sys.argv[1])), nprocs=2, start_method="fork")
