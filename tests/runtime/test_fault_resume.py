"""Fault tolerance: SIGKILL one rank mid-training, the job stops; `plait run --resume` continues from the
last checkpoint and ends with the same parameters as a run that was never interrupted."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from runkit import (
    SCRIPTS,
    none_alive,
    plait_run,
    read_pids,
    run_script_main,
    start_plait_run,
    wait_for,
    zoo_plan,
)

from plait.plan import save_plan
from plait.runtime import FINAL_FILE, checkpoint_dir, latest_checkpoint, read_metrics, run_ranks

STEPS, EVERY = 10, 2


def train_args(plan: Path, out: Path, *extra: str) -> list[str]:
    return [str(SCRIPTS / "train_zoo.py"), "--nproc", "2", "--plan", str(plan), "--out", str(out), "--",
            "--steps", str(STEPS), "--ckpt-every", str(EVERY), *extra]


def checkpoint_step(out: Path) -> int:
    """Steps done by the latest checkpoint of a run (0 when none)."""
    try:
        path = latest_checkpoint(checkpoint_dir(out))
    except Exception:  # the pointer can name a checkpoint being pruned right now
        return 0
    return 0 if path is None else int(path.name.split("_")[1])


@pytest.mark.slow
def test_kill_one_rank_then_resume(tmp_path: Path) -> None:
    plan = save_plan(zoo_plan("gpt-tiny", "replicate", world=2, global_batch=4), tmp_path / "plan.json")
    out, pid_dir = tmp_path / "run", tmp_path / "pids"
    pid_dir.mkdir()

    # 1. train slowly, and SIGKILL rank 1 once two checkpoints exist
    job = start_plait_run(train_args(plan, out, "--sleep", "0.3", "--pid-dir", str(pid_dir)))
    wait_for(lambda: checkpoint_step(out) >= 2 * EVERY, 120, "the second checkpoint")
    pids = read_pids(pid_dir, 2)
    os.kill(pids[1], signal.SIGKILL)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 1
    assert f"error: rank 1 (pid {pids[1]}) failed with signal SIGKILL; stopped the other 1 ranks" in stderr
    assert none_alive(pids)
    assert not (out / FINAL_FILE).exists()
    killed_at = checkpoint_step(out)
    assert 2 * EVERY <= killed_at < STEPS

    # 2. resume: it continues after the last checkpoint and finishes
    resumed = plait_run(_with_resume(train_args(plan, out)))
    assert resumed.returncode == 0, resumed.stderr + "\n--- stdout ---\n" + resumed.stdout[-1500:]
    assert f"resume: continuing after step {killed_at} (checkpoint of a 2-rank run)" in resumed.stdout
    assert f"done: {STEPS - killed_at} steps from step {killed_at}" in resumed.stdout

    # 3. an uninterrupted run of the same script (on forked ranks: same code, quicker to start)
    env = {**os.environ, "PLAIT_PLAN": str(plan), "PLAIT_OUT": str(tmp_path / "clean"), "PLAIT_RESUME": "0"}
    run_ranks(run_script_main, 2, "train_zoo.py", train_args(plan, out)[train_args(plan, out).index("--") + 1 :], env=env)

    final = torch.load(out / FINAL_FILE)
    reference = torch.load(tmp_path / "clean" / FINAL_FILE)
    assert final.keys() == reference.keys()
    for name, tensor in final.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-6, msg=f"{name} after resume")
    steps = read_metrics(out / "metrics.jsonl")
    clean_steps = read_metrics(tmp_path / "clean" / "metrics.jsonl")
    assert [m.step for m in steps] == list(range(1, STEPS + 1))  # redone steps are not counted twice
    torch.testing.assert_close(torch.tensor([m.loss for m in steps]), torch.tensor([m.loss for m in clean_steps]), rtol=0, atol=1e-6)


def _with_resume(args: list[str]) -> list[str]:
    """Insert --resume among plait run's own options (before the script's `--`)."""
    cut = args.index("--")
    return [*args[:cut], "--resume", *args[cut:]]
