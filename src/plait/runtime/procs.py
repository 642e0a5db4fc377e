"""Supervise a job's rank processes: learn which one ends first, and stop them all when one fails.

Ctrl-C (SIGINT) and SIGTERM never raise into the supervisor's code: while ``stop_signals()`` is active its
handler only records the signal on the queue that also carries the ranks' exits, so the supervisor sees it at
its next look (within ``POLL_S``) whatever it was doing, and no lock or half-started rank is left behind.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, Literal, Protocol, TypeAlias

Outcome = Literal["ok", "failed", "timeout", "interrupted"]
DEFAULT_GRACE_S = 5.0
POLL_S = 0.1  # the longest the supervisor waits before it looks again (for a signal taken by another thread)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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


@dataclass(frozen=True)
class _Exited:
    rank: int
    code: int


@dataclass(frozen=True)
class _Signalled:
    signum: int


_Event: TypeAlias = _Exited | _Signalled


class StopSignals:
    """SIGINT and SIGTERM recorded as events for the supervisor instead of raised into whatever code runs."""

    def __init__(self) -> None:
        self.events: queue.SimpleQueue[_Event] = queue.SimpleQueue()
        self._previous: dict[signal.Signals, Any] = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.events.put(_Signalled(signum))  # SimpleQueue.put is reentrant: safe in a signal handler

    def install(self) -> None:
        """Record SIGINT and SIGTERM from now on (only the main thread sets handlers; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)

    def restore(self) -> None:
        """Put back the handlers that ``install`` replaced (also what a forked rank does first)."""
        while self._previous:
            sig, handler = self._previous.popitem()
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """Record SIGINT and SIGTERM for the supervisor while the block runs; start the ranks inside it."""
    stops = StopSignals()
    stops.install()
    try:
        yield stops
    finally:
        stops.restore()


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
    stops: StopSignals | None = None,
    clean_codes: Collection[int] = (0,),
) -> Supervision:
    """Wait for every rank; on a failure, a timeout or Ctrl-C stop them all (SIGTERM, then SIGKILL after
    ``grace_s``, or at once on another Ctrl-C). Pass the ``stops`` active while the ranks were started.
    An exit code in ``clean_codes`` is not a failure (an elastic run's ranks leave for a resize with their own)."""
    if stops is None:
        with stop_signals() as own:
            return supervise(procs, timeout_s=timeout_s, grace_s=grace_s, on_failure=on_failure, stops=own,
                             clean_codes=clean_codes)
    start = time.monotonic()
    for proc in procs:
        threading.Thread(target=_report_exit, args=(proc, stops.events), daemon=True).start()
    deadline = None if timeout_s is None else start + timeout_s
    outcome, failed, codes = _watch(procs, stops.events, deadline, on_failure, clean_codes)
    if outcome != "ok":
        _stop_all(procs, codes, stops.events, grace_s)
    return Supervision(
        outcome=outcome,
        failed_rank=failed,
        exit_codes=tuple(codes.get(p.rank) for p in procs),
        elapsed_s=time.monotonic() - start,
    )


def _report_exit(proc: RankProcess, events: queue.SimpleQueue[_Event]) -> None:
    events.put(_Exited(proc.rank, proc.wait()))


def _watch(
    procs: Sequence[RankProcess],
    events: queue.SimpleQueue[_Event],
    deadline: float | None,
    on_failure: Callable[[int], None] | None,
    clean_codes: Collection[int] = (0,),
) -> tuple[Outcome, int | None, dict[int, int]]:
    """Wait for the first failure, the deadline or a stop signal; the outcome, failed rank, codes so far."""
    codes: dict[int, int] = {}
    while len(codes) < len(procs):
        if deadline is not None and time.monotonic() >= deadline:
            return "timeout", None, codes
        event = _next_event(events, deadline)
        if isinstance(event, _Signalled):
            return "interrupted", None, codes
        if event is None:
            continue
        codes[event.rank] = event.code
        if event.code not in clean_codes:
            if on_failure is not None:
                on_failure(event.rank)
            return "failed", event.rank, codes
    return "ok", None, codes


def _next_event(events: queue.SimpleQueue[_Event], deadline: float | None) -> _Event | None:
    """The next exit or signal, or None after ``POLL_S`` (or at ``deadline`` if sooner)."""
    wait = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
    try:
        return events.get(timeout=wait)
    except queue.Empty:
        return None


def _stop_all(
    procs: Sequence[RankProcess], codes: dict[int, int], events: queue.SimpleQueue[_Event], grace_s: float
) -> None:
    """SIGTERM every rank's group, SIGKILL what is left after ``grace_s`` (or at another Ctrl-C), and collect
    the exit codes."""
    for proc in procs:
        signal_group(proc.pid, signal.SIGTERM)
        signal_group(proc.pid, signal.SIGCONT)  # a stopped rank acts on SIGTERM only once continued
    _collect(codes, events, len(procs), time.monotonic() + grace_s, until_signal=True)
    for proc in procs:  # also reaches children a rank left behind in its group
        signal_group(proc.pid, signal.SIGKILL)
    _collect(codes, events, len(procs), time.monotonic() + grace_s, until_signal=False)


def _collect(
    codes: dict[int, int],
    events: queue.SimpleQueue[_Event],
    total: int,
    deadline: float,
    *,
    until_signal: bool,
) -> None:
    """Gather exit codes until all ``total`` are in, ``deadline`` passes or (``until_signal``) a signal."""
    while len(codes) < total and time.monotonic() < deadline:
        event = _next_event(events, deadline)
        if isinstance(event, _Exited):
            codes[event.rank] = event.code
        elif isinstance(event, _Signalled) and until_signal:
            return


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
