"""The launcher: torchrun's environment, prefixed output, and one clear message when a rank fails, dies or
the user presses Ctrl-C, with every rank stopped."""

from __future__ import annotations

import io
import os
import signal
import textwrap
import time
from pathlib import Path

import pytest
from runkit import SCRIPTS, none_alive, plait_run, read_pids, start_plait_run, wait_for, zoo_plan

from plait.cli.main import main
from plait.plan import save_plan
from plait.runtime import launch

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
Path(sys.argv[1], f"rank{rank}.pid").write_text(str(os.getpid()))
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


def test_ctrl_c_stops_every_rank(tmp_path: Path) -> None:
    script = write(tmp_path, "hang.py", HANG_OR_DIE)
    proc = start_plait_run([str(script), "--nproc", "2", "--", str(tmp_path), "-1", "none"])
    wait_for(lambda: len(list(tmp_path.glob("*.pid"))) == 2, 60, "both ranks to start")
    pids = read_pids(tmp_path, 2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "error: interrupted; stopped all 2 ranks" in stderr
    assert none_alive(pids)


def test_training_script_that_raises_on_one_rank(tmp_path: Path) -> None:
    """The real thing: gloo ranks in the Trainer; rank 1's data loader raises while rank 0 waits in a collective."""
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
