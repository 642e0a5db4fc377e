"""The launcher: torchrun's environment, prefixed output, and one clear message when a rank fails, dies or
the user presses Ctrl-C, with every rank stopped."""

from __future__ import annotations

import importlib
import io
import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from runkit import (
    SCRIPTS,
    finish,
    none_alive,
    plait_run,
    read_pids,
    reaping,
    start_plait_run,
    wait_for,
    zoo_plan,
)

from plait.cli.main import main
from plait.plan import save_plan
from plait.runtime import launch, launch_argv

launch_module = importlib.import_module("plait.runtime.launch")  # the package exports a function of that name

# Ranks of these scripts import nothing heavy, so they start in a fraction of a second.
ENV_SCRIPT = """
import os, sys
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
        "OMP_NUM_THREADS", "GLOO_SOCKET_IFNAME", "PLAIT_OUT", "PLAIT_RESUME", "MKL_NUM_THREADS"]
print(" ".join(f"{k}={os.environ.get(k)}" for k in keys))
print("args", sys.argv[1:])
print(f"note from {os.environ['RANK']}", file=sys.stderr)
"""

HANG_OR_DIE = """
import os, signal, sys, time
from pathlib import Path
rank = int(os.environ["RANK"])
Path(sys.argv[1], f".rank{rank}").write_text(str(os.getpid()))
os.replace(Path(sys.argv[1], f".rank{rank}"), Path(sys.argv[1], f"rank{rank}.pid"))  # whole, once it is there
while len(list(Path(sys.argv[1]).glob("*.pid"))) < int(os.environ["WORLD_SIZE"]):
    time.sleep(0.02)
if rank == int(sys.argv[2]):
    if sys.argv[3] == "raise":
        import atexit
        atexit.register(lambda: print("a warning printed at exit", file=sys.stderr))
        raise RuntimeError(f"boom on rank {rank}")
    if sys.argv[3] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
time.sleep(120)  # the other ranks would wait for the failed one for ever
"""

# A rank that sleeps until stopped; with "ignore-term" it outlives SIGTERM (noting it in rankR.term).
SLEEPER = """
import os, signal, sys, time
from pathlib import Path
rank, folder = os.environ["RANK"], Path(sys.argv[1])
if sys.argv[2] == "ignore-term":
    signal.signal(signal.SIGTERM, lambda *_: (folder / f"rank{rank}.term").touch())
(folder / f".rank{rank}").write_text(str(os.getpid()))
os.replace(folder / f".rank{rank}", folder / f"rank{rank}.pid")
while True:
    time.sleep(60)
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_environment_and_prefixed_output(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    result = launch(write(tmp_path, "env.py", ENV_SCRIPT), nproc=3, script_args=["--flag", "x"], out_dir=tmp_path / "o",
                    stdout=out, stderr=err)
    assert result.ok and result.exit_code == 0 and result.message == ""
    lines = out.getvalue().splitlines()
    port = {line.split("MASTER_PORT=")[1].split()[0] for line in lines if "MASTER_PORT=" in line}
    assert len(port) == 1 and int(port.pop()) > 0
    for r in range(3):
        (env_line,) = [line for line in lines if line.startswith(f"[rank {r}] RANK=")]
        assert f"RANK={r} LOCAL_RANK={r} WORLD_SIZE=3 LOCAL_WORLD_SIZE=3 MASTER_ADDR=127.0.0.1" in env_line
        assert f"OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME=lo PLAIT_OUT={(tmp_path / 'o').resolve()} PLAIT_RESUME=0" in env_line
        assert env_line.endswith("MKL_NUM_THREADS=1")
        assert f"[rank {r}] args ['--flag', 'x']" in lines
        assert f"[rank {r}] note from {r}" in err.getvalue().splitlines()
    assert all(ex.exit_code == 0 for ex in result.ranks)


@pytest.mark.parametrize(("mode", "why"), [("raise", "exit code 1: RuntimeError: boom on rank 1"), ("kill", "signal SIGKILL")])
def test_one_rank_fails_all_stop(tmp_path: Path, mode: str, why: str) -> None:
    script = write(tmp_path, "hang.py", HANG_OR_DIE)
    t0 = time.monotonic()
    done = plait_run([str(script), "--nproc", "3", "--", str(tmp_path), "1", mode])
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    pids = read_pids(tmp_path, 3)
    assert errors[0] == f"error: rank 1 (pid {pids[1]}) failed with {why}; stopped the other 2 ranks"
    assert none_alive(pids)
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_stops_every_rank(tmp_path: Path, presses: int) -> None:
    script = write(tmp_path, "hang.py", HANG_OR_DIE)
    with reaping(tmp_path):
        proc = start_plait_run([str(script), "--nproc", "2", "--", str(tmp_path), "-1", "none"])
        started = files_there(tmp_path, "*.pid", 2)
        wait_for(lambda: started() or proc.poll() is not None, 120, "both ranks to start")
        pids = read_pids(tmp_path, 2)
        for _ in range(presses):
            proc.send_signal(signal.SIGINT)
        code, _, stderr = finish(proc, 120)
        assert code == 130, stderr
        assert "error: interrupted; stopped all 2 ranks" in stderr
        assert none_alive(pids)


def signal_self(sig: signal.Signals) -> None:
    """Send ``sig`` to this process, as Ctrl-C (SIGINT) or ``kill`` (SIGTERM) would."""
    os.kill(os.getpid(), sig)


def signal_after_first_rank(launcher: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C once rank 0 is started and before rank 1 is."""
    class SignalAfterFirst(launcher._Rank):
        def __init__(self, rank: int, *args: Any) -> None:
            super().__init__(rank, *args)
            if rank == 0:
                signal_self(signal.SIGINT)

    monkeypatch.setattr(launcher, "_Rank", SignalAfterFirst)


def signal_before_supervision(launcher: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C once every rank is started and before supervision starts its threads."""
    real = launcher.supervise

    def late(*args: Any, **kwargs: Any) -> Any:
        signal_self(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(launcher, "supervise", late)


def files_there(folder: Path, pattern: str, count: int) -> Callable[[], bool]:
    """A test for ``wait_for``: at least ``count`` files in ``folder`` match ``pattern``."""
    return lambda: len(list(folder.glob(pattern))) >= count


def signal_when(folder: Path, steps: list[tuple[str, signal.Signals]]) -> threading.Thread:
    """A thread that sends each signal once files match its pattern in ``folder`` (all 3 for "*.pid")."""
    def run() -> None:
        for pattern, sig in steps:
            want = 3 if pattern == "*.pid" else 1
            wait_for(files_there(folder, pattern, want), 120, f"{want} {pattern} files")
            signal_self(sig)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("moment", ["after the first rank", "before supervision", "while ranks run", "twice"])
def test_ctrl_c_at_any_moment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moment: str) -> None:
    """Ctrl-C (sent to this process, so it comes at a set moment) stops every started rank and is never lost;
    the second signal of "twice" (SIGTERM while the ranks outlive SIGTERM) SIGKILLs them without waiting."""
    script = write(tmp_path, "sleeper.py", SLEEPER)
    arm: dict[str, Callable[[], threading.Thread | None]] = {
        "after the first rank": lambda: signal_after_first_rank(launch_module, monkeypatch),
        "before supervision": lambda: signal_before_supervision(launch_module, monkeypatch),
        "while ranks run": lambda: signal_when(tmp_path, [("*.pid", signal.SIGINT)]),
        "twice": lambda: signal_when(tmp_path, [("*.pid", signal.SIGINT), ("*.term", signal.SIGTERM)]),
    }
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    grace_s = 600.0 if moment == "twice" else 60.0
    with reaping(tmp_path):
        sender = arm[moment]()
        try:
            argv = [sys.executable, str(script), str(tmp_path), "ignore-term" if moment == "twice" else "-"]
            result = launch_argv(argv, nproc=3, timeout_s=300, grace_s=grace_s, stdout=io.StringIO(),
                                 stderr=io.StringIO())
        except KeyboardInterrupt:
            pytest.fail(f"Ctrl-C {moment} escaped the launcher")
        if sender is not None:
            sender.join(60)
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
        assert (result.exit_code, result.message) == (130, "interrupted; stopped all 3 ranks")
        assert none_alive([ex.pid for ex in result.ranks])
        want = -signal.SIGKILL if moment == "twice" else -signal.SIGTERM
        assert [ex.exit_code for ex in result.ranks] == [want] * 3
        assert result.elapsed_s < grace_s / 2


def test_training_script_that_raises_on_one_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real thing: gloo ranks in the Trainer; rank 1's data loader raises while rank 0 waits in a collective."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # gloo on CPU also where a GPU is (one GPU cannot hold 2 ranks)
    plan = save_plan(zoo_plan("gpt-tiny", "replicate", world=2, global_batch=4), tmp_path / "plan.json")
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    done = plait_run([str(SCRIPTS / "train_zoo.py"), "--nproc", "2", "--plan", str(plan), "--",
                      "--steps", "5", "--fail-rank", "1", "--fail-step", "2", "--pid-dir", str(pid_dir)])
    assert done.returncode == 1
    pids = read_pids(pid_dir, 2)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: rank 1 (pid {pids[1]}) failed with exit code 1: ValueError: bad batch at step 2 on rank 1; "
                      "stopped the other 1 ranks"]
    assert "[rank 0] step 2/5" in done.stdout  # it did train before the failure
    assert none_alive(pids)


def test_bad_arguments_fail_before_any_rank_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = save_plan(zoo_plan("mlp-tiny", "fsdp", world=2, global_batch=4), tmp_path / "plan.json")
    script = write(tmp_path, "env.py", ENV_SCRIPT)
    cases = [
        (["run", str(tmp_path / "missing.py"), "--nproc", "2"], "training script", "does not exist"),
        (["run", str(script), "--nproc", "3", "--plan", str(plan)], "is for 2 ranks", "but --nproc is 3"),
        (["run", str(script), "--nproc", "2", "--plan", str(tmp_path / "nope.json")], "plan file", "does not exist"),
        (["run", str(script), "--resume", "--nproc", "2"], "--resume needs --out", ""),
        (["run", str(script)], "give --nproc N", ""),
        (["run", str(script), "--nproc", "0"], "--nproc must be at least 1", ""),
    ]
    for argv, first, second in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and first in err and second in err, err
        assert "RANK=" not in capsys.readouterr().out


def test_plan_fixes_the_number_of_ranks(tmp_path: Path) -> None:
    plan = save_plan(zoo_plan("mlp-tiny", "replicate", world=2, global_batch=4), tmp_path / "plan.json")
    done = plait_run([str(write(tmp_path, "env.py", ENV_SCRIPT)), "--plan", str(plan)])
    assert done.returncode == 0, done.stderr
    assert "WORLD_SIZE=2" in done.stdout and "[rank 1]" in done.stdout and "[rank 2]" not in done.stdout
    assert "all 2 ranks finished" in done.stderr
    assert os.environ.get("PLAIT_PLAN") is None


def test_module_runs_with_python_m(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "envmod.py", ENV_SCRIPT)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    done = plait_run(["-m", "envmod", "--nproc", "2", "--", "--flag"])
    assert done.returncode == 0, done.stderr
    assert "[rank 1] RANK=1" in done.stdout and "[rank 0] args ['--flag']" in done.stdout
    assert "all 2 ranks finished" in done.stderr
