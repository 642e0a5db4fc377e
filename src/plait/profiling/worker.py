"""One rank of `plait profile`: ``python -m plait.profiling.worker`` (started by ``plait.profiling.launch``).

The parent holds a TCPStore; the rank reads its config from it, joins the process group through it,
reports progress (rank 0) and writes its results back to it as JSON, or its traceback if it fails.
"""

from __future__ import annotations

import json
import os
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from plait.profiling.bench_comm import collective_results, process_groups, sync_results
from plait.profiling.bench_compute import compute_results
from plait.profiling.bench_links import link_groups, link_results
from plait.profiling.config import ProfileConfig
from plait.profiling.timing import timer_for
from plait.serde import from_dict

STORE_ENV = "PLAIT_PROFILE_STORE"  # host:port of the parent's TCPStore
KEY_CONFIG, KEY_PROGRESS = "plait/config", "plait/progress"


def node_done_key(node_rank: int) -> str:
    """Store key a node's `plait profile` sets when its ranks are done (node 0 waits for it before leaving)."""
    return f"plait/node_done/{node_rank}"


def result_key(rank: int) -> str:
    """Store key of one rank's results."""
    return f"plait/result/{rank}"


def error_key(rank: int) -> str:
    """Store key of the traceback of a rank that failed (the parent puts it in its error message)."""
    return f"plait/error/{rank}"


def _connect() -> tuple[dist.TCPStore, int, int]:
    host, port = os.environ[STORE_ENV].rsplit(":", 1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=120))
    return store, rank, world


BASE_WINDOW_S = 2e-3
CONTENDED_WINDOW_S = 0.1


def _device(cfg: ProfileConfig, rank: int) -> torch.device:
    if cfg.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))  # the rank's place on its own node
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def run_rank(store: dist.TCPStore, rank: int, world: int) -> dict[str, Any]:
    """Measure compute at each concurrency level, then collectives and (across nodes) the link; returns this
    rank's results. Compute and collectives are measured among node 0's ranks (0 ... nproc-1)."""
    cfg = from_dict(ProfileConfig, json.loads(store.get(KEY_CONFIG)))
    torch.set_num_threads(cfg.threads_per_rank)
    device = _device(cfg, rank)
    backend = "nccl" if cfg.device == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.PrefixStore("plait/pg", store), rank=rank, world_size=world,
                            timeout=timedelta(seconds=cfg.timeout_s))
    timer = timer_for(device)

    def tick() -> None:
        if rank == 0:
            store.add(KEY_PROGRESS, 1)

    compute: dict[str, Any] = {}
    for level in cfg.concurrency:
        dist.barrier()
        # Ranks sharing cores take turns in scheduler time slices (a few ms): a short window would catch
        # one rank running alone, so with several ranks busy every window spans many slices.
        timer.min_time_s = CONTENDED_WINDOW_S if level > 1 and cfg.device == "cpu" else BASE_WINDOW_S
        if rank < level:  # the other ranks wait in the next barrier and use no CPU meanwhile
            compute[str(level)] = compute_results(cfg, timer, device)
        dist.barrier()
        tick()
    groups = process_groups(cfg)  # every rank creates the groups once, in the same order
    pairs = link_groups(cfg)
    collectives = collective_results(cfg, timer, device, tick, groups) if world >= 2 else []
    sync = sync_results(cfg, timer, device, tick, groups) if world >= 2 and cfg.device == "cpu" else []
    links = link_results(cfg, timer, device, tick, pairs)
    dist.barrier()
    dist.destroy_process_group()
    return {"rank": rank, "compute": compute, "collectives": collectives, "sync": sync, "links": links}


def main() -> None:
    """Entry point of one rank; a failure is reported to the parent through the store, then re-raised."""
    store, rank, world = _connect()
    try:
        result = run_rank(store, rank, world)
    except BaseException:
        store.set(error_key(rank), traceback.format_exc())
        raise
    store.set(result_key(rank), json.dumps(result))


if __name__ == "__main__":
    main()
