"""Run a Python function on N forked local ranks (fast: no interpreter start) and gather their results.

Fork before this process starts any thread pool: keep ``OMP_NUM_THREADS=1`` (or ``torch.set_num_threads(1)``)
and do not initialise torch.distributed in the parent.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import tempfile
import traceback
from collections.abc import Callable, Mapping
from multiprocessing.context import ForkContext, ForkProcess
from pathlib import Path
from typing import Any

import torch

from plait.errors import LaunchError
from plait.runtime.launch import free_port, rank_env
from plait.runtime.procs import (
    DEFAULT_GRACE_S,
    StopSignals,
    describe_exit,
    signal_group,
    stop_signals,
    supervise,
)


class _Forked:
    """A forked rank with the wait() interface the supervisor needs."""

    def __init__(self, rank: int, proc: ForkProcess) -> None:
        self.rank = rank
        self.proc = proc
        assert proc.pid is not None
        self.pid = proc.pid

    def wait(self) -> int:
        """Block until the rank ends; its exit code."""
        self.proc.join()
        code = self.proc.exitcode
        return -1 if code is None else code

    def kill(self) -> None:
        """SIGKILL the rank's process group and reap the rank."""
        signal_group(self.pid, signal.SIGKILL)
        self.proc.join(DEFAULT_GRACE_S)


def _start(ctx: ForkContext, rank: int, child_args: tuple[Any, ...]) -> _Forked:
    """Fork one rank and make it lead its own process group at once, before the child gets to run."""
    proc = ctx.Process(target=_child, args=child_args, daemon=False)
    proc.start()
    forked = _Forked(rank, proc)
    with contextlib.suppress(OSError):  # the child may have called setsid already: then it leads its group
        os.setpgid(forked.pid, forked.pid)
    return forked


def _child(fn: Callable[..., Any], args: tuple[Any, ...], env: dict[str, str], result: Path, error: Path,
           stops: StopSignals) -> None:
    with contextlib.suppress(PermissionError):  # the parent may have made this rank a group leader already
        os.setsid()  # own session and process group, so the supervisor can stop anything this rank starts
    stops.restore()  # the signal handlers this process had before the parent's supervision
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    try:
        value = fn(*args)
        torch.save(value, result)
    except SystemExit as exc:
        if exc.code not in (0, None):
            error.write_text(f"SystemExit: {exc.code}\n")
            os._exit(exc.code if isinstance(exc.code, int) else 1)
        torch.save(None, result)
    except BaseException as exc:  # report every failure to the parent, then exit non-zero
        error.write_text(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        os._exit(1)
    os._exit(0)


def run_ranks(
    fn: Callable[..., Any],
    nproc: int,
    *args: Any,
    timeout_s: float | None = 300.0,
    grace_s: float = DEFAULT_GRACE_S,
    env: Mapping[str, str] | None = None,
    threads: int = 1,
) -> list[Any]:
    """Call ``fn(*args)`` on ``nproc`` forked ranks with the launcher's environment; their return values by rank.

    If a rank raises or dies, every rank is stopped and a ``LaunchError`` names the rank and carries its
    traceback. Return values travel through ``torch.save`` (tensors, dicts, lists, numbers).
    """
    ctx = mp.get_context("fork")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="plait-ranks-") as tmp, stop_signals() as stops:
        paths = [(Path(tmp) / f"rank{r}.pt", Path(tmp) / f"rank{r}.err") for r in range(nproc)]
        ranks: list[_Forked] = []
        try:
            for r in range(nproc):
                child_env = rank_env(r, nproc, port, threads=threads, base=env)
                ranks.append(_start(ctx, r, (fn, args, child_env, *paths[r], stops)))
            sup = supervise(ranks, timeout_s=timeout_s, grace_s=grace_s, stops=stops)
        except BaseException:  # a rank that could not start (or a bug): leave no rank running
            for started in ranks:
                started.kill()
            raise
        if sup.outcome != "ok":
            raise LaunchError(_failure(sup.outcome, sup.failed_rank, sup.exit_codes, paths, timeout_s))
        return [torch.load(result, weights_only=False) for result, _ in paths]


def _failure(outcome: str, failed: int | None, codes: tuple[int | None, ...], paths: list[tuple[Path, Path]], timeout_s: float | None) -> str:
    if outcome == "timeout":
        return f"ranks ran past {timeout_s} s and were stopped"
    if outcome == "interrupted":
        return "interrupted; all ranks stopped"
    assert failed is not None
    err = paths[failed][1]
    detail = err.read_text() if err.is_file() else ""
    head = f"rank {failed} failed with {describe_exit(codes[failed])}"
    return f"{head}: {detail}" if detail else head
