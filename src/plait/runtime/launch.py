"""Launch a training script on N ranks per node with a torchrun-compatible environment and prefixed logs.

Across nodes the rendezvous is static, as torchrun's ``--rdzv-backend=static``: one ``plait run`` per node,
all given the same ``--nnodes``, ``--nproc`` and node 0's address and port; node k runs the global ranks
k*nproc ... k*nproc+nproc-1, and rank 0 (on node 0) hosts the store the ranks meet at.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from plait.errors import LaunchError, PlaitError
from plait.runtime.envvars import DIST_TIMEOUT_ENV, OUT_ENV, PLAN_ENV, RESUME_ENV
from plait.runtime.nodes import LOOPBACK, SINGLE_NODE, NodeSpec, mesh_on_nodes
from plait.runtime.procs import DEFAULT_GRACE_S, describe_exit, signal_group, stop_signals, supervise

TAIL_LINES = 200
TORCH_RANK_PREFIX = re.compile(r"^\[rank\d+\]: ?")  # torch.distributed prefixes a rank's traceback lines


@dataclass(frozen=True, kw_only=True)
class RankExit:
    """One rank's end: its pid, exit code (negative for a signal), last error line and last output line."""

    rank: int
    pid: int
    exit_code: int | None
    last_error: str  # the exception ending the last traceback on stderr, else the last stderr line
    last_output: str  # last non-empty line on stdout


@dataclass(frozen=True, kw_only=True)
class LaunchResult:
    """How a launched job ended; ``message`` names the failed rank and why (empty on success)."""

    exit_code: int  # 0 ok, 1 a rank failed or timed out, 130 interrupted
    ranks: tuple[RankExit, ...]
    failed_rank: int | None
    message: str
    elapsed_s: float

    @property
    def ok(self) -> bool:
        """True when every rank exited with status 0."""
        return self.exit_code == 0


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now (for the rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def rank_env(
    local_rank: int,
    nproc: int,
    port: int,
    *,
    threads: int = 1,
    base: Mapping[str, str] | None = None,
    node: NodeSpec = SINGLE_NODE,
) -> dict[str, str]:
    """One rank's environment: torchrun's variables for local rank ``local_rank`` of ``nproc`` on ``node``,
    ``threads`` OpenMP/MKL threads, gloo on the node's interface, unbuffered output."""
    env = dict(os.environ if base is None else base)
    rank, world = node.global_rank(local_rank, nproc), node.nnodes * nproc
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(nproc),
        GROUP_RANK=str(node.node_rank),
        GROUP_WORLD_SIZE=str(node.nnodes),
        ROLE_RANK=str(rank),
        ROLE_WORLD_SIZE=str(world),
        ROLE_NAME="default",
        MASTER_ADDR=node.master_addr,
        MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        GLOO_SOCKET_IFNAME=node.ifname,
        PYTHONUNBUFFERED="1",
    )
    return env


class _Rank:
    """A rank started with Popen in its own session (process group), with its output pumped and prefixed."""

    def __init__(self, rank: int, argv: Sequence[str], env: dict[str, str], out: IO[str], err: IO[str], lock: threading.Lock) -> None:
        self.rank = rank
        self.popen = subprocess.Popen(
            list(argv), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, stdin=subprocess.DEVNULL
        )
        self.pid = self.popen.pid
        self.muted = False
        self.tail: collections.deque[tuple[str, str]] = collections.deque(maxlen=TAIL_LINES)
        assert self.popen.stdout is not None and self.popen.stderr is not None
        self.pumps = [
            threading.Thread(target=self._pump, args=(self.popen.stdout, out, "out", lock), daemon=True),
            threading.Thread(target=self._pump, args=(self.popen.stderr, err, "err", lock), daemon=True),
        ]
        try:
            for t in self.pumps:
                t.start()
        except BaseException:
            self.kill()
            raise

    def wait(self) -> int:
        """Block until the rank ends; its exit code."""
        return self.popen.wait()

    def kill(self) -> None:
        """SIGKILL the rank's process group and reap the rank."""
        signal_group(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(DEFAULT_GRACE_S)

    def _pump(self, source: IO[bytes], sink: IO[str], stream: str, lock: threading.Lock) -> None:
        for raw in iter(source.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            self.tail.append((stream, line))
            if self.muted:
                continue
            with lock:
                sink.write(f"[rank {self.rank}] {line}\n")
                sink.flush()
        source.close()

    def last_line(self, wanted: str) -> str:
        """The last non-empty line the rank printed on ``wanted`` ("err" or "out")."""
        for stream, line in reversed(list(self.tail)):
            if stream == wanted and line.strip():
                return TORCH_RANK_PREFIX.sub("", line.strip())
        return ""

    def last_exception(self) -> str:
        """The exception line that ends the rank's last Python traceback on stderr ("" if none)."""
        found, in_traceback = "", False
        for stream, raw in self.tail:
            line = TORCH_RANK_PREFIX.sub("", raw)
            if stream != "err" or not line.strip():
                continue
            if line.startswith("Traceback (most recent call last)"):
                in_traceback = True
            elif in_traceback and not line[0].isspace():
                found, in_traceback = line.strip(), False
        return found

    def join_pumps(self, timeout_s: float = 2.0) -> None:
        """Wait for the output pumps to drain the rank's pipes."""
        for t in self.pumps:
            t.join(timeout_s)


def launch_argv(
    argv: Sequence[str],
    *,
    nproc: int,
    node: NodeSpec = SINGLE_NODE,
    env: Mapping[str, str] | None = None,
    threads: int = 1,
    timeout_s: float | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    on_start: Callable[[dict[int, int]], None] | None = None,
    clean_codes: Collection[int] = (0,),
) -> LaunchResult:
    """Run ``argv`` as this node's ``nproc`` ranks; if one fails, stop all and report it. Ctrl-C or SIGTERM to
    this process (when called on the main thread) stops them all too, whenever it comes: exit code 130.
    ``on_start`` is told every rank's pid ({rank: pid}) once all have started; exit codes in ``clean_codes``
    are not failures (every rank of a successful launch exits with one of them; see ``RankExit.exit_code``)."""
    if nproc < 1:
        raise PlaitError(f"--nproc must be at least 1, got {nproc}")
    out, err = stdout or sys.stdout, stderr or sys.stderr
    port, lock = node.master_port or free_port(node.master_addr), threading.Lock()
    ranks: list[_Rank] = []

    def mute_others(failed: int) -> None:
        for rank in ranks:
            rank.muted = rank.rank != failed

    with stop_signals() as stops:  # before the first rank starts: a signal from now on is seen by supervise
        try:
            for local in range(nproc):
                child_env = rank_env(local, nproc, port, threads=threads, base=env, node=node)
                ranks.append(_Rank(node.global_rank(local, nproc), argv, child_env, out, err, lock))
            if on_start is not None:
                on_start({r.rank: r.pid for r in ranks})
            sup = supervise(ranks, timeout_s=timeout_s, grace_s=grace_s, on_failure=mute_others, stops=stops,
                            clean_codes=clean_codes)
        except BaseException:  # a rank that could not start (or a bug): leave no rank running
            for started in ranks:
                started.kill()
            raise
        for rank in ranks:
            rank.join_pumps()
    exits = tuple(
        RankExit(rank=r.rank, pid=r.pid, exit_code=code, last_error=r.last_exception() or r.last_line("err"),
                 last_output=r.last_line("out"))
        for r, code in zip(ranks, sup.exit_codes, strict=True)
    )
    return LaunchResult(
        exit_code={"ok": 0, "failed": 1, "timeout": 1, "interrupted": 130}[sup.outcome],
        ranks=exits,
        failed_rank=sup.failed_rank,
        message=_message(sup.outcome, sup.failed_rank, exits, timeout_s, node.where()),
        elapsed_s=sup.elapsed_s,
    )


def _message(outcome: str, failed: int | None, exits: tuple[RankExit, ...], timeout_s: float | None, where: str) -> str:
    n = len(exits)
    if outcome == "ok":
        return ""
    if outcome == "interrupted":
        return f"interrupted; stopped all {n} ranks{where}"
    if outcome == "timeout":
        return f"the job ran past its {timeout_s} s limit; stopped all {n} ranks{where}"
    (ex,) = [e for e in exits if e.rank == failed]
    # a rank that exits with an error says why on stderr (else maybe stdout); a signal leaves no last words
    line = ex.last_error or (ex.last_output if ex.exit_code is not None and ex.exit_code > 0 else "")
    why = f": {line}" if line else ""
    return f"rank {failed} (pid {ex.pid}) failed with {describe_exit(ex.exit_code)}{why}; stopped the other {n - 1} ranks{where}"


def launch(
    script: str | os.PathLike[str],
    *,
    nproc: int | None = None,
    module: bool = False,
    script_args: Sequence[str] = (),
    plan: str | os.PathLike[str] | None = None,
    resume: bool = False,
    out_dir: str | os.PathLike[str] | None = None,
    node: NodeSpec = SINGLE_NODE,
    dist_timeout_s: float | None = None,
    python: str = sys.executable,
    **kwargs: Any,
) -> LaunchResult:
    """Run a Python training script (``module=True``: ``python -m script``) on this node's ``nproc`` ranks,
    what ``plait run`` does; ``nproc`` defaults to the plan's world size over ``node.nnodes``.
    ``dist_timeout_s`` sets PLAIT_DIST_TIMEOUT_S, the ranks' collective timeout. See ``launch_argv``."""
    target = ["-m", str(script)] if module else [str(_checked_script(Path(script)))]
    env = dict(kwargs.pop("env", None) or os.environ)
    mesh_note = ""
    if plan is not None:
        plan_path, nproc, mesh_note = _checked_plan(Path(plan), nproc, node.nnodes)
        env[PLAN_ENV] = str(plan_path)
    if nproc is None:
        raise PlaitError("give the number of ranks per node (--nproc N) or a plan, whose mesh fixes it")
    if dist_timeout_s is not None:
        if not dist_timeout_s > 0:
            raise PlaitError(f"--dist-timeout must be a positive number of seconds, got {dist_timeout_s}")
        env[DIST_TIMEOUT_ENV] = str(dist_timeout_s)
    env[RESUME_ENV] = "1" if resume else "0"
    if out_dir is not None:
        out = Path(out_dir).resolve()
        out.mkdir(parents=True, exist_ok=True)
        env[OUT_ENV] = str(out)
    if node.nnodes > 1:
        _announce(node, nproc, mesh_note, kwargs.get("stderr") or sys.stderr)
    return launch_argv([python, "-u", *target, *script_args], nproc=nproc, node=node, env=env, **kwargs)


def _announce(node: NodeSpec, nproc: int, mesh_note: str, err: IO[str]) -> None:
    """One line on where this node stands in a multi-node job."""
    first, world = node.global_rank(0, nproc), node.nnodes * nproc
    rdzv = f"{node.master_addr}:{node.master_port}"
    err.write(f"plait run: node {node.node_rank} of {node.nnodes} runs ranks {first}-{first + nproc - 1} of {world} "
              f"(rendezvous {rdzv}, gloo on {node.ifname}){mesh_note}\n")
    err.flush()


def _checked_script(path: Path) -> Path:
    if not path.is_file():
        why = "is a folder" if path.is_dir() else "does not exist"
        raise PlaitError(f"training script {path} {why}; give the path of a Python file (or a module name with -m)")
    return path


def _checked_plan(path: Path, nproc: int | None, nnodes: int = 1) -> tuple[Path, int, str]:
    """Load the plan once here so a bad file fails before any rank starts; its path, the ranks per node and
    (across nodes) a note on which mesh axes stay inside a node."""
    from plait.plan.io import load_plan

    plan = load_plan(path)
    world, shape = plan.world_size, plan.mesh.shape
    if nnodes == 1 and nproc is not None and world != nproc:
        raise PlaitError(f"plan {path} is for {world} ranks (mesh {shape}) but --nproc is {nproc}; "
                         f"use --nproc {world} or re-plan for {nproc} ranks")
    if nnodes > 1 and (world % nnodes or (nproc is not None and nproc * nnodes != world)):
        given = f"--nnodes {nnodes} x --nproc {nproc} = {nnodes * nproc}" if nproc is not None else f"--nnodes {nnodes}"
        fix = f"use --nproc {world // nnodes}" if world % nnodes == 0 else f"use a number of nodes that divides {world}"
        raise PlaitError(f"plan {path} is for {world} ranks (mesh {shape}), which does not match {given}; "
                         f"{fix} or re-plan for the job's ranks")
    per_node = world // nnodes
    note = ""
    if nnodes > 1:
        inside, across = mesh_on_nodes(shape, plan.mesh.axes, per_node)
        note = f"; mesh axes inside each node: {', '.join(inside) or 'none'}, across nodes: {', '.join(across) or 'none'}"
    return path.resolve(), per_node, note


def raise_on_failure(result: LaunchResult) -> None:
    """Turn a failed launch into a ``LaunchError`` carrying the launch's exit code."""
    if result.ok:
        return
    error = LaunchError(result.message)
    error.exit_code = result.exit_code
    raise error
