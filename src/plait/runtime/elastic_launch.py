"""Elastic resize, the launcher's side: run a job, watch for a new number of ranks, re-plan, restart it there.

``ElasticRun`` launches the ranks as ``plait run`` does and watches a control file (default ``OUT/elastic.json``,
holding ``{"nproc": 3}`` or just ``3``); it re-reads it every ``poll_s`` and at once on ``SIGHUP`` to this process,
and ``ElasticRun.resize(n)`` asks from Python. On a new wanted number of ranks it first re-plans (``replan(plan,
n)``, in this process; a failure is printed and the job keeps its size), then sends ``SIGUSR1`` to every rank.
The ranks agree at the next step boundary, checkpoint and exit with ``RESIZE_EXIT`` (``plait.runtime.elastic``);
the launcher starts ``n`` ranks on the new plan with resume. The runtime never imports the planners: the CLI
(``plait run --elastic``) and ``plait.elastic.run_elastic`` pass ``replan`` in. A ``replan`` with a ``warm(plan)``
method (``plait.planners.request.Replanner``, which keeps the model's captures and ILP results across re-plans) is
warmed in a background thread when the run starts, so a resize only runs what depends on the device count.
See docs/elastic.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from plait.errors import PlaitError
from plait.plan.io import load_plan, save_plan
from plait.plan.ir import Plan
from plait.plan.layout import layout_name
from plait.runtime.checkpoint import checkpoint_dir, latest_checkpoint
from plait.runtime.elastic import RESIZE_EXIT, RESIZE_SIGNAL, ready_file
from plait.runtime.envvars import ELASTIC_ENV
from plait.runtime.launch import LaunchResult, launch
from plait.runtime.procs import signal_group

CONTROL_FILE = "elastic.json"
ELASTIC_DIR = "elastic"  # under the run's output folder: the re-made plans (plan-N.json)
RANKS_DIR = "ranks"  # under ELASTIC_DIR: the running ranks' ready files
RELOAD_SIGNAL = signal.SIGHUP  # to the launcher: re-read the control file now
Replan = Callable[[Plan, int], Plan]  # the running plan and a number of ranks -> a plan for that many


def read_control(path: Path) -> int | None:
    """The number of ranks a control file asks for (None when there is no file); a PlaitError naming what is wrong
    with a bad one. It holds a JSON object ``{"nproc": N}`` or just the number."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PlaitError(f"cannot read the control file {path}: {exc}") from None
    try:
        raw: Any = json.loads(text)
    except ValueError:
        raw = None
    if isinstance(raw, dict):
        unknown = set(raw) - {"nproc"}
        if unknown or "nproc" not in raw:
            raise PlaitError(f"control file {path} holds {text!r}; write {{\"nproc\": N}} (or just N), the number of "
                             f"ranks wanted{f'; unknown keys {sorted(unknown)}' if unknown else ''}")
        raw = raw["nproc"]
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise PlaitError(f"control file {path} holds {text!r}, not a number of ranks; write {{\"nproc\": N}} "
                         "(or just N) with N >= 1")
    return raw


@dataclass(frozen=True, kw_only=True)
class ResizeEvent:
    """One resize: after which step, from and to how many ranks, the re-planning time and the plan chosen."""

    step: int
    old_nproc: int
    new_nproc: int
    replan_s: float
    layout: str
    plan_path: str


@dataclass(frozen=True, kw_only=True)
class ElasticResult:
    """How an elastic run ended: its last launch's result, and every resize on the way."""

    result: LaunchResult
    resizes: tuple[ResizeEvent, ...] = field(default=())
    nproc: int = 0  # ranks of the last launch

    @property
    def ok(self) -> bool:
        """True when the last launch's ranks all finished training."""
        return self.result.ok


@dataclass
class _Planned:
    nproc: int
    plan_path: Path
    seconds: float
    layout: str


class ElasticRun:
    """A training job whose number of ranks can change while it runs (see module docstring)."""

    def __init__(self, script: str | os.PathLike[str], *, plan: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                 replan: Replan, control: str | os.PathLike[str] | None = None, script_args: Sequence[str] = (),
                 module: bool = False, resume: bool = False, env: dict[str, str] | None = None,
                 dist_timeout_s: float | None = None, timeout_s: float | None = None, python: str = sys.executable,
                 stdout: IO[str] | None = None, stderr: IO[str] | None = None, poll_s: float = 0.5,
                 warm: bool = True) -> None:
        self.script, self.script_args, self.module, self.python = script, tuple(script_args), module, python
        self.out = Path(out_dir).resolve()
        self.control = Path(control).resolve() if control is not None else self.out / CONTROL_FILE
        self.replan, self.resume, self.env = replan, resume, dict(env if env is not None else os.environ)
        self.dist_timeout_s, self.timeout_s, self.poll_s = dist_timeout_s, timeout_s, poll_s
        self.stdout, self.stderr = stdout, stderr
        self.plan_path = Path(plan).resolve()
        self.plan = load_plan(self.plan_path)
        self.nproc = self.plan.world_size
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._asked: int | None = None  # from resize()
        self._pids: dict[int, int] = {}  # the running ranks' pids
        self._signalled: set[int] = set()
        self._pending: _Planned | None = None  # planned and asked of the ranks
        self._last_control: tuple[float, str] | None = None
        self._failed_target: int | None = None
        self.warm = warm  # warm a replan that can be warmed (see the module docstring)
        self._warming: threading.Thread | None = None

    # ---- asking -------------------------------------------------------------------------------

    def resize(self, nproc: int) -> None:
        """Ask the running job to move to ``nproc`` ranks (from any thread; the latest request wins)."""
        if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
            raise PlaitError(f"resize needs a number of ranks >= 1, not {nproc!r}")
        with self._lock:
            self._asked = nproc
        self._wake.set()

    def signalled_ranks(self) -> int:
        """How many ranks of the running launch have been sent the resize signal (0 between launches)."""
        with self._lock:
            return len(self._signalled)

    def _say(self, text: str) -> None:
        err = self.stderr or sys.stderr
        err.write(f"{text}\n")
        err.flush()

    # ---- running ------------------------------------------------------------------------------

    def run(self) -> ElasticResult:
        """Launch, watch and resize until training ends or a rank fails; the last launch's result and the resizes."""
        folder = self.out / ELASTIC_DIR
        folder.mkdir(parents=True, exist_ok=True)
        resizes: list[ResizeEvent] = []
        watcher = threading.Thread(target=self._watch, name="plait-elastic-watch", daemon=True)
        with _reload_on_signal(self._wake):
            watcher.start()
            self._start_warming()
            try:
                resume = self.resume
                while True:
                    result = self._launch_once(folder / RANKS_DIR, resume)
                    codes = {r.exit_code for r in result.ranks}
                    if codes != {RESIZE_EXIT}:
                        return ElasticResult(result=result, resizes=tuple(resizes), nproc=self.nproc)
                    resizes.append(self._switch(folder))
                    resume = True
            finally:
                self._stop.set()
                self._wake.set()
                watcher.join(timeout=30)
                if self._warming is not None:
                    self._warming.join(timeout=30)

    def _start_warming(self) -> None:
        """Warm ``replan`` for the running plan in the background when it can be warmed (and ``warm`` is on)."""
        warm = getattr(self.replan, "warm", None)
        if not self.warm or not callable(warm):
            return
        plan = self.plan

        def work() -> None:
            try:
                warm(plan)
            except Exception as exc:  # never fail the run: the first resize then plans from scratch
                self._say(f"elastic: warming the re-planner failed ({exc}); a resize re-plans from scratch")

        self._warming = threading.Thread(target=work, name="plait-elastic-warm", daemon=True)
        self._warming.start()

    def _launch_once(self, ranks_dir: Path, resume: bool) -> LaunchResult:
        shutil.rmtree(ranks_dir, ignore_errors=True)
        ranks_dir.mkdir(parents=True)
        env = {**self.env, ELASTIC_ENV: str(ranks_dir)}
        with self._lock:
            self._pids, self._signalled, self._pending, self._failed_target = {}, set(), None, None
        self._wake.set()  # look at the control file again: a request may be waiting from before the restart
        try:
            return launch(self.script, nproc=self.nproc, module=self.module, script_args=self.script_args,
                          plan=self.plan_path, resume=resume, out_dir=self.out, dist_timeout_s=self.dist_timeout_s,
                          python=self.python, env=env, timeout_s=self.timeout_s, stdout=self.stdout, stderr=self.stderr,
                          on_start=self._started, clean_codes=(0, RESIZE_EXIT))
        finally:
            with self._lock:
                self._pids = {}

    def _started(self, pids: dict[int, int]) -> None:
        with self._lock:
            self._pids = dict(pids)
        self._wake.set()

    def _switch(self, folder: Path) -> ResizeEvent:
        """After the ranks left for a resize: move to the planned plan (or re-plan now) and say so."""
        found = latest_checkpoint(checkpoint_dir(self.out))
        step = int(found.name.split("_")[-1]) if found is not None else 0
        with self._lock:
            planned, asked = self._pending, self._asked
        if planned is None or (asked is not None and asked != planned.nproc):
            planned = self._plan_for(asked if asked is not None else self.nproc, folder)
        old = self.nproc
        self.nproc, self.plan_path = planned.nproc, planned.plan_path
        self.plan = load_plan(self.plan_path)
        self._say(f"resize: {old} -> {planned.nproc} ranks at step {step}, re-planned in {planned.seconds:.1f} s "
                  f"({planned.layout}), resuming")
        return ResizeEvent(step=step, old_nproc=old, new_nproc=planned.nproc, replan_s=planned.seconds,
                           layout=planned.layout, plan_path=str(planned.plan_path))

    def _plan_for(self, nproc: int, folder: Path) -> _Planned:
        if nproc == self.nproc:
            return _Planned(nproc=nproc, plan_path=self.plan_path, seconds=0.0, layout=layout_name(self.plan))
        t0 = time.perf_counter()
        new = self.replan(self.plan, nproc)
        seconds = time.perf_counter() - t0
        if new.world_size != nproc:
            raise PlaitError(f"re-planning for {nproc} ranks gave a plan for {new.world_size}")
        path = save_plan(new, folder / f"plan-{nproc}.json")
        return _Planned(nproc=nproc, plan_path=path, seconds=seconds, layout=layout_name(new))

    # ---- watching -----------------------------------------------------------------------------

    def _watch(self) -> None:
        """Until the run ends: read the control file, plan a new size ahead, signal the ranks that listen."""
        while not self._stop.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._look()
            except Exception as exc:  # never let the watcher die: the job keeps its size
                self._say(f"elastic: {exc}; keeping {self.nproc} ranks")

    def _look(self) -> None:
        self._read_control()
        with self._lock:
            wanted, pids, pending = self._asked, dict(self._pids), self._pending
        if wanted is None or not pids or wanted == self._failed_target:
            return
        if wanted == self.nproc and pending is None:
            return
        if pending is None or pending.nproc != wanted:
            self._say(f"elastic: asked for {wanted} ranks (running {self.nproc}); re-planning")
            try:
                planned = self._plan_for(wanted, self.out / ELASTIC_DIR)
            except PlaitError as exc:
                with self._lock:
                    self._failed_target = wanted
                self._say(f"elastic: cannot re-plan for {wanted} ranks: {exc}; keeping {self.nproc} ranks")
                return
            with self._lock:
                if self._pids != pids:  # the launch ended while planning; the next one looks again
                    return
                self._pending = planned
        self._signal_ready(pids)

    def _signal_ready(self, pids: dict[int, int]) -> None:
        """Send the resize signal to every rank that has said it listens and has not had it yet."""
        ranks_dir = self.out / ELASTIC_DIR / RANKS_DIR
        for rank, pid in pids.items():
            with self._lock:
                if rank in self._signalled or self._pids.get(rank) != pid:
                    continue
            try:
                said = ready_file(ranks_dir, rank).read_text().strip()
            except OSError:
                self._wake.set()  # not listening yet: look again soon
                continue
            if said == str(pid):
                signal_group(pid, RESIZE_SIGNAL)
                with self._lock:
                    self._signalled.add(rank)
            else:
                self._wake.set()

    def _read_control(self) -> None:
        """Take a new request from the control file when it changed; say once what is wrong with a bad one."""
        try:
            stat = self.control.stat()
        except FileNotFoundError:
            return
        try:
            text = self.control.read_text()
        except OSError:
            return
        key = (stat.st_mtime, text)
        if key == self._last_control:
            return
        self._last_control = key
        try:
            wanted = read_control(self.control)
        except PlaitError as exc:
            self._say(f"elastic: {exc}; keeping {self.nproc} ranks")
            return
        if wanted is not None:
            with self._lock:
                self._asked = wanted


@contextlib.contextmanager
def _reload_on_signal(wake: threading.Event) -> Iterator[None]:
    """While the run lasts, ``SIGHUP`` to this process makes the watcher re-read the control file at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        wake.set()

    previous = signal.signal(RELOAD_SIGNAL, handler)
    try:
        yield
    finally:
        signal.signal(RELOAD_SIGNAL, previous)
