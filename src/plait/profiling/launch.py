"""Start the ranks of `plait profile` with the runtime's launcher, report their progress, collect their results.

The parent holds the TCPStore (bound to 127.0.0.1 on a free port) that the ranks rendezvous through,
report progress to and write their results (or their traceback) to. The ranks run under
``plait.runtime.launch.launch_argv``: if one fails, every other rank is stopped and the failing rank's
traceback becomes one ``ProfilingError``.

Across nodes (``--nnodes``) each node runs one `plait profile`: node 0's holds the store at
``--master-addr:--master-port``, the others connect to it before starting their ranks, and node 0 collects
every rank's results, then waits until every node has said it is done before it closes the store.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from plait.profiling.config import ProfileConfig, ProfilingError
from plait.profiling.worker import KEY_CONFIG, KEY_PROGRESS, STORE_ENV, error_key, node_done_key, result_key
from plait.runtime.launch import LaunchResult, launch_argv
from plait.runtime.nodes import SINGLE_NODE, NodeSpec
from plait.runtime.procs import describe_exit
from plait.serde import to_dict

POLL_S = 0.1


def run_ranks(cfg: ProfileConfig, progress: Callable[[int], None] | None = None,
              node: NodeSpec = SINGLE_NODE) -> list[dict[str, Any]]:
    """Run this node's ranks to completion; on node 0 every rank's results (rank order), elsewhere []."""
    store = _open_store(cfg, node)
    env = dict(os.environ, **{STORE_ENV: f"{node.master_addr}:{store.port}"})
    with open(os.devnull, "w") as quiet, _reporting(store, progress):  # a failure's traceback comes from the store
        result = launch_argv([sys.executable, "-m", "plait.profiling.worker"], nproc=cfg.nproc, node=node, env=env,
                             threads=cfg.threads_per_rank, timeout_s=cfg.timeout_s, stdout=quiet, stderr=quiet)
    if result.exit_code == 130:
        raise KeyboardInterrupt
    if not result.ok:
        raise _failure(cfg, result, store)
    if node.node_rank > 0:
        store.set(node_done_key(node.node_rank), "1")  # the last use of node 0's store from this node
        return []
    results = _gather(cfg, store)
    _wait(store, [node_done_key(k) for k in range(1, node.nnodes)], cfg, "every node to finish")
    return results


def _open_store(cfg: ProfileConfig, node: NodeSpec) -> dist.TCPStore:
    """Node 0 hosts the store (a free port on one node) and puts the config in it; other nodes connect to it."""
    timeout = timedelta(seconds=cfg.timeout_s if node.nnodes > 1 else 60)
    if node.node_rank > 0:
        try:
            return dist.TCPStore(node.master_addr, node.master_port, is_master=False, timeout=timeout)
        except (RuntimeError, OSError) as exc:
            raise ProfilingError(f"node {node.node_rank} cannot reach node 0's `plait profile` at "
                                 f"{node.master_addr}:{node.master_port} ({exc}); start it there with --node-rank 0") from None
    store = dist.TCPStore(node.master_addr, node.master_port, is_master=True, wait_for_workers=False, timeout=timeout)
    store.set(KEY_CONFIG, json.dumps(to_dict(cfg)))
    store.add(KEY_PROGRESS, 0)
    return store


def _gather(cfg: ProfileConfig, store: dist.TCPStore) -> list[dict[str, Any]]:
    """Every rank's results; a rank of another node that failed instead names itself and its traceback."""
    keys = [result_key(rank) for rank in range(cfg.world_size)]
    _wait(store, keys, cfg, "the results of every rank", failed=range(cfg.world_size))
    return [json.loads(store.get(key)) for key in keys]


def _wait(store: dist.TCPStore, keys: list[str], cfg: ProfileConfig, what: str, failed: range = range(0)) -> None:
    """Poll until every key is set; raise if one of the ``failed`` ranks reported an error, or after the timeout."""
    deadline = time.monotonic() + cfg.timeout_s
    while not store.check(keys):
        for rank in failed:
            if store.check([error_key(rank)]):
                why = store.get(error_key(rank)).decode(errors="replace")
                raise ProfilingError(f"rank {rank} of `plait profile` failed on another node; its error:\n{why}")
        if time.monotonic() > deadline:
            raise ProfilingError(f"`plait profile` waited {cfg.timeout_s:.0f} s for {what}; is every node running?")
        time.sleep(POLL_S)


@contextmanager
def _reporting(store: dist.TCPStore, progress: Callable[[int], None] | None) -> Iterator[None]:
    """Pass the ranks' finished steps to ``progress`` every POLL_S seconds while the block runs, and once after."""
    if progress is None:
        yield
        return
    stop = threading.Event()

    def report() -> None:
        while not stop.wait(POLL_S):
            try:
                progress(int(store.add(KEY_PROGRESS, 0)))
            except (RuntimeError, OSError):  # node 0's store went away (its run ended or failed): stop reporting
                return

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    try:
        yield
    finally:
        stop.set()
        reporter.join()
    with suppress(RuntimeError, OSError):
        progress(int(store.add(KEY_PROGRESS, 0)))


def _failure(cfg: ProfileConfig, result: LaunchResult, store: dist.TCPStore) -> ProfilingError:
    """The error of a failed run: the failing rank with its traceback (from the store, else its last stderr line)."""
    rank = result.failed_rank
    if rank is None:
        return ProfilingError(
            f"`plait profile` did not finish within {cfg.timeout_s:.0f} s; every rank was stopped. "
            "Try --quick, fewer ranks (--nproc), or a quieter machine"
        )
    (ended,) = [ex for ex in result.ranks if ex.rank == rank]
    why = _stored_error(store, rank) or ended.last_error
    detail = f"; its error:\n{why}" if why else ""
    others = [r for r in range(cfg.world_size) if r not in {ex.rank for ex in result.ranks} and _stored_error(store, r)]
    if others:  # a rank of another node failed too, maybe first (this node's ranks then lose their peer)
        detail += f"\nrank {others[0]} on another node failed as well; its error:\n{_stored_error(store, others[0])}"
    where, stopped = (f" on node {rank // cfg.nproc}", "every rank of this node") if cfg.nnodes > 1 else ("", "every rank")
    return ProfilingError(f"rank {rank} of `plait profile` failed{where} with {describe_exit(ended.exit_code)} "
                          f"and {stopped} was stopped{detail}")


def _stored_error(store: dist.TCPStore, rank: int) -> str:
    """The traceback ``rank`` left in the store ("" if none, or if the store is gone)."""
    try:
        return store.get(error_key(rank)).decode(errors="replace") if store.check([error_key(rank)]) else ""
    except (RuntimeError, OSError):
        return ""
