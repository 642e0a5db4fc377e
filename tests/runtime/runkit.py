"""Runtime test kit: plans made the way users get them (capture, then the planner) and `plait run` helpers."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import cache
from pathlib import Path

import torch

from plait.cluster import local_cluster
from plait.graph.capture import capture
from plait.graph.model_graph import ModelGraph
from plait.models import zoo_model
from plait.plan.ir import Plan
from plait.planners import build_dp_plan
from plait.planners.data_parallel import DataParallelKind
from plait.runtime.procs import pid_alive


@cache
def zoo_graph(name: str) -> ModelGraph:
    """The captured ModelGraph of a zoo model (built on the meta device)."""
    zm = zoo_model(name)
    with torch.device("meta"):
        model = zm.build()
    return capture(model, zm.make_batch(2, device="meta"), name=name, loss_fn=zm.loss)


def zoo_plan(
    name: str,
    kind: DataParallelKind,
    *,
    world: int,
    global_batch: int,
    micro_batch: int | None = None,
    num_micro: int | None = None,
    bucket_bytes: int = 16 * 1024,
    nodes: int = 1,
) -> Plan:
    """A data-parallel plan of a fixed kind for ``world`` local ranks (``nodes`` > 1 makes a hybrid mesh)."""
    cluster = local_cluster(world)
    if nodes > 1:
        cluster = replace(cluster, num_nodes=nodes, devices_per_node=world // nodes)
    return build_dp_plan(zoo_graph(name), cluster, kind=kind, global_batch=global_batch, micro_batch=micro_batch,
                         num_micro=num_micro, bucket_bytes=bucket_bytes)


SCRIPTS = Path(__file__).resolve().parent / "scripts"
PLAIT = [sys.executable, "-c", "from plait.cli.main import main; main()"]


def run_script_main(script: str, argv: list[str]) -> None:
    """Run ``scripts/<script>``'s ``main()`` in this process with ``argv`` (for forked ranks)."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, SCRIPTS / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.argv = [script, *argv]
    module.main()


def plait_run(args: list[str], *, timeout_s: float = 180.0) -> subprocess.CompletedProcess[str]:
    """``plait run ARGS`` in a fresh process; its exit code and captured output."""
    return subprocess.run([*PLAIT, "run", *args], capture_output=True, text=True, timeout=timeout_s, check=False)


def start_plait_run(args: list[str]) -> subprocess.Popen[str]:
    """``plait run ARGS`` started in the background, output captured."""
    return subprocess.Popen([*PLAIT, "run", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], timeout_s: float = 60.0) -> tuple[int, str, str]:
    """Wait for a started ``plait run``: exit code, stdout, stderr; kill it and fail after ``timeout_s``."""
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"plait run did not exit within {timeout_s} s; stderr:\n{err[-2000:]}") from None
    return proc.returncode, out, err


@contextlib.contextmanager
def reaping(pid_dir: Path) -> Iterator[None]:
    """On leaving, SIGKILL each rank that wrote its pid into ``pid_dir`` and still runs (a failed test's)."""
    try:
        yield
    finally:
        for path in pid_dir.glob("*.pid"):
            with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
                pid = int(path.read_text())
                if pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll until ``predicate()`` holds; fail the test naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def read_pids(pid_dir: Path, n: int) -> list[int]:
    """The pids the ranks wrote into ``pid_dir`` (rank0.pid, rank1.pid, ...)."""
    return [int((pid_dir / f"rank{r}.pid").read_text()) for r in range(n)]


def none_alive(pids: list[int], timeout_s: float = 30.0) -> bool:
    """True once none of ``pids`` is running (waits up to ``timeout_s`` for the kernel to reap them)."""
    deadline = time.monotonic() + timeout_s
    while any(pid_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
