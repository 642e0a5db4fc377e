"""Start the ranks of `plait profile` as local processes, watch them, and always stop them.

The parent holds the TCPStore (bound to 127.0.0.1 on a free port) that the ranks rendezvous through,
read their progress from and write their results to. If a rank fails, every other rank is stopped and
the failing rank's error becomes one ``ProfilingError``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from typing import IO, Any

import torch.distributed as dist

from plait.profiling.config import ProfileConfig, ProfilingError
from plait.profiling.worker import KEY_CONFIG, KEY_PROGRESS, STORE_ENV, result_key
from plait.serde import to_dict

LOOPBACK = "127.0.0.1"
POLL_S = 0.1


def rank_env(cfg: ProfileConfig, rank: int, store_port: int) -> dict[str, str]:
    """Environment of one rank: its place in the job, one thread, loopback only."""
    env = dict(os.environ)
    threads = str(cfg.threads_per_rank)
    env.update(
        {
            STORE_ENV: f"{LOOPBACK}:{store_port}",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(cfg.nproc),
            "MASTER_ADDR": LOOPBACK,
            "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


class RankProcesses:
    """The rank processes of one run; a context manager that stops every one it started on exit."""

    def __init__(self, cfg: ProfileConfig, store_port: int) -> None:
        self.cfg = cfg
        self.store_port = store_port
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[IO[bytes]] = []

    def __enter__(self) -> RankProcesses:
        for rank in range(self.cfg.nproc):
            log = tempfile.TemporaryFile()
            self.logs.append(log)
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "plait.profiling.worker"],
                    env=rank_env(self.cfg, rank, self.store_port),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # our own process group: stopping it reaches its children
                )
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        for log in self.logs:
            log.close()

    def stop(self) -> None:
        """Terminate every rank still running, then kill what does not exit within 5 s."""
        for p in self.procs:
            if p.poll() is None:
                _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait()

    def failed(self) -> int | None:
        """The first rank that exited with an error, if any."""
        for rank, p in enumerate(self.procs):
            code = p.poll()
            if code is not None and code != 0:
                return rank
        return None

    def all_done(self) -> bool:
        """Whether every rank exited successfully."""
        return all(p.poll() == 0 for p in self.procs)

    def output(self, rank: int, limit: int = 4000) -> str:
        """The last ``limit`` characters a rank printed."""
        log = self.logs[rank]
        log.flush()
        log.seek(0)
        return log.read().decode(errors="replace")[-limit:]


def _signal_group(p: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, sig)  # the rank leads its own session, so its group id is its pid


def run_ranks(cfg: ProfileConfig, progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Run the profile's ranks to completion and return each rank's results (rank order)."""
    store = dist.TCPStore(LOOPBACK, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    store.set(KEY_CONFIG, json.dumps(to_dict(cfg)))
    store.add(KEY_PROGRESS, 0)
    deadline = time.monotonic() + cfg.timeout_s
    with RankProcesses(cfg, store.port) as ranks:
        while not ranks.all_done():
            bad = ranks.failed()
            if bad is not None:
                raise ProfilingError(f"rank {bad} of `plait profile` failed; its output ends with:\n{ranks.output(bad)}")
            if time.monotonic() > deadline:
                raise ProfilingError(
                    f"`plait profile` did not finish within {cfg.timeout_s:.0f} s; every rank was stopped. "
                    "Try --quick, fewer ranks (--nproc), or a quieter machine"
                )
            if progress is not None:
                progress(int(store.add(KEY_PROGRESS, 0)))
            time.sleep(POLL_S)
        if progress is not None:
            progress(int(store.add(KEY_PROGRESS, 0)))
    return [json.loads(store.get(result_key(rank))) for rank in range(cfg.nproc)]
