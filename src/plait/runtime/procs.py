"""Supervise a job's rank processes: learn which one ends first, and stop them all when one fails."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Outcome = Literal["ok", "failed", "timeout", "interrupted"]
DEFAULT_GRACE_S = 5.0


class RankProcess(Protocol):
    """A started rank: its number, its pid (also its process-group id) and a blocking wait for its exit code."""

    rank: int
    pid: int

    def wait(self) -> int:
        """Block until the process ends; the exit code, negative for a signal."""
        ...


@dataclass(frozen=True, kw_only=True)
class Supervision:
    """How a job ended: the outcome, the first failing rank and every rank's exit code (None if unknown)."""

    outcome: Outcome
    failed_rank: int | None
    exit_codes: tuple[int | None, ...]
    elapsed_s: float


def describe_exit(code: int | None) -> str:
    """``exit code 1``, ``signal SIGKILL`` or ``no exit status``."""
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group led by ``pid`` (every rank runs in its own group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def supervise(
    procs: Sequence[RankProcess],
    *,
    timeout_s: float | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    on_failure: Callable[[int], None] | None = None,
) -> Supervision:
    """Wait for every rank; on a failure, a timeout or Ctrl-C stop them all (SIGTERM, then SIGKILL)."""
    start = time.monotonic()
    exits: queue.Queue[tuple[int, int]] = queue.Queue()
    for proc in procs:
        threading.Thread(target=lambda p=proc: exits.put((p.rank, p.wait())), daemon=True).start()
    codes: dict[int, int] = {}
    outcome: Outcome = "ok"
    failed: int | None = None
    try:
        while len(codes) < len(procs):
            try:
                rank, code = exits.get(timeout=0.1)
            except queue.Empty:
                if timeout_s is not None and time.monotonic() - start > timeout_s:
                    outcome = "timeout"
                    break
                continue
            codes[rank] = code
            if code != 0:
                outcome, failed = "failed", rank
                if on_failure is not None:
                    on_failure(rank)
                break
    except KeyboardInterrupt:
        outcome = "interrupted"
    if outcome != "ok":
        _stop_all(procs, codes, exits, grace_s)
    return Supervision(
        outcome=outcome,
        failed_rank=failed,
        exit_codes=tuple(codes.get(p.rank) for p in procs),
        elapsed_s=time.monotonic() - start,
    )


def _stop_all(procs: Sequence[RankProcess], codes: dict[int, int], exits: queue.Queue[tuple[int, int]], grace_s: float) -> None:
    """SIGTERM every rank's group, SIGKILL what is left after ``grace_s``, and collect the exit codes."""
    for proc in procs:
        signal_group(proc.pid, signal.SIGTERM)
    _collect(codes, exits, len(procs), time.monotonic() + grace_s)
    for proc in procs:  # also reaches children a rank left behind in its group
        signal_group(proc.pid, signal.SIGKILL)
    _collect(codes, exits, len(procs), time.monotonic() + grace_s)


def _collect(codes: dict[int, int], exits: queue.Queue[tuple[int, int]], total: int, deadline: float) -> None:
    while len(codes) < total and time.monotonic() < deadline:
        try:
            rank, code = exits.get(timeout=0.05)
        except queue.Empty:
            continue
        codes[rank] = code


def pid_alive(pid: int) -> bool:
    """True while a process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
