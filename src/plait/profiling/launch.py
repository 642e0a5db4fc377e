"""Start the ranks of `plait profile` with the runtime's launcher, report their progress, collect their results.

The parent holds the TCPStore (bound to 127.0.0.1 on a free port) that the ranks rendezvous through,
report progress to and write their results (or their traceback) to. The ranks run under
``plait.runtime.launch.launch_argv``: if one fails, every other rank is stopped and the failing rank's
traceback becomes one ``ProfilingError``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from plait.profiling.config import ProfileConfig, ProfilingError
from plait.profiling.worker import KEY_CONFIG, KEY_PROGRESS, STORE_ENV, error_key, result_key
from plait.runtime.launch import LOOPBACK, LaunchResult, launch_argv
from plait.runtime.procs import describe_exit
from plait.serde import to_dict

POLL_S = 0.1


def run_ranks(cfg: ProfileConfig, progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Run the profile's ranks to completion and return each rank's results (rank order)."""
    store = dist.TCPStore(LOOPBACK, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    store.set(KEY_CONFIG, json.dumps(to_dict(cfg)))
    store.add(KEY_PROGRESS, 0)
    env = dict(os.environ, **{STORE_ENV: f"{LOOPBACK}:{store.port}"})
    with open(os.devnull, "w") as quiet, _reporting(store, progress):  # a failure's traceback comes from the store
        result = launch_argv([sys.executable, "-m", "plait.profiling.worker"], nproc=cfg.nproc, env=env,
                             threads=cfg.threads_per_rank, timeout_s=cfg.timeout_s, stdout=quiet, stderr=quiet)
    if result.exit_code == 130:
        raise KeyboardInterrupt
    if not result.ok:
        raise _failure(cfg, result, store)
    return [json.loads(store.get(result_key(rank))) for rank in range(cfg.nproc)]


@contextmanager
def _reporting(store: dist.TCPStore, progress: Callable[[int], None] | None) -> Iterator[None]:
    """Pass the ranks' finished steps to ``progress`` every POLL_S seconds while the block runs, and once after."""
    if progress is None:
        yield
        return
    stop = threading.Event()

    def report() -> None:
        while not stop.wait(POLL_S):
            progress(int(store.add(KEY_PROGRESS, 0)))

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    try:
        yield
    finally:
        stop.set()
        reporter.join()
    progress(int(store.add(KEY_PROGRESS, 0)))


def _failure(cfg: ProfileConfig, result: LaunchResult, store: dist.TCPStore) -> ProfilingError:
    """The error of a failed run: the failing rank with its traceback (from the store, else its last stderr line)."""
    rank = result.failed_rank
    if rank is None:
        return ProfilingError(
            f"`plait profile` did not finish within {cfg.timeout_s:.0f} s; every rank was stopped. "
            "Try --quick, fewer ranks (--nproc), or a quieter machine"
        )
    ended = result.ranks[rank]
    key = error_key(rank)
    why = store.get(key).decode(errors="replace") if store.check([key]) else ended.last_error
    detail = f"; its error:\n{why}" if why else ""
    return ProfilingError(f"rank {rank} of `plait profile` failed with {describe_exit(ended.exit_code)} "
                          f"and every rank was stopped{detail}")
