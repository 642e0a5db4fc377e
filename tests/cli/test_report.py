"""`plait report RUN_DIR` (PNGs of a run's metrics) and `plait run --adaptive` (the ranks' TrainConfig)."""

from __future__ import annotations

import importlib
import json
import math
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from clikit import assert_one_clear_error, plait_in_process

from plait.cli import run_cmd
from plait.runtime.metrics import METRICS_FILE, StepMetrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASIC = ["loss.png", "step_time.png"]
ADAPTIVE = ["batch_size.png", "noise_scale.png", "efficiency.png", "gain.png", "goodput.png"]


def write_metrics(run_dir: Path, steps: int, *, adaptive: bool) -> Path:
    """A metrics file as MetricsLog writes it (adaptive: the first step's noise scale not known yet)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        extra: dict[str, Any] = {}
        if adaptive:
            extra = {"batch_size": 32 * (1 + step // 4), "noise_scale": math.nan if step == 1 else 100.0 + 10 * step,
                     "efficiency": 1.0 / (1 + step / 10), "gain": 1.0 + step / 20, "lr_factor": 1.0,
                     "progress": float(step)}
            if step > 6:  # the goodput key of newer files; older records derive it (samples/s x efficiency)
                extra["goodput"] = 320.0 * extra["efficiency"]
        m = StepMetrics(step=step, loss=3.0 / step, step_s=0.1 + 0.01 * step, samples_per_s=320.0, time=1e9 + step,
                        **extra)
        lines.append(json.dumps(m.record()))
    path = run_dir / METRICS_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_pngs(run_dir: Path, names: list[str], stdout: str) -> None:
    report = run_dir / "report"
    assert sorted(p.name for p in report.iterdir()) == sorted(names)
    for name in names:
        data = (report / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 5_000, (name, len(data))  # axes, a line and labels, not an empty canvas
        assert str(report / name) in stdout.splitlines()


def test_report_of_fixed_batch_run_draws_loss_and_step_time(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_metrics(run, 12, adaptive=False)
    result = plait_in_process("report", str(run))
    assert result.returncode == 0, result.stderr
    assert_pngs(run, BASIC, result.stdout)


def test_report_of_adaptive_run_draws_batch_noise_efficiency_gain_goodput(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_metrics(run, 12, adaptive=True)
    result = plait_in_process("report", str(run))
    assert result.returncode == 0, result.stderr
    assert_pngs(run, BASIC + ADAPTIVE, result.stdout)
    # run again: the report is redrawn over the old one
    assert plait_in_process("report", str(run)).returncode == 0


def test_report_errors_are_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert_one_clear_error(plait_in_process("report", str(missing)), "no run directory", str(missing))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    assert_one_clear_error(plait_in_process("report", str(empty_dir)), "has no metrics.jsonl")
    no_steps = tmp_path / "nosteps"
    no_steps.mkdir()
    (no_steps / METRICS_FILE).write_text("\n")
    assert_one_clear_error(plait_in_process("report", str(no_steps)), "records no steps")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / METRICS_FILE).write_text("{not json\n")
    assert_one_clear_error(plait_in_process("report", str(garbage)), "not a plait metrics file")
    for bad in (missing, empty_dir, no_steps, garbage):
        assert plait_in_process("report", str(bad)).returncode == 2
        assert not (bad / "report").exists() or not any((bad / "report").iterdir())


def test_lr_scaling_choices_are_the_rules() -> None:
    from plait.adaptive import LR_SCALING_RULES

    assert run_cmd.LR_SCALING_CHOICES == LR_SCALING_RULES


def test_run_adaptive_reaches_the_train_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from plait.runtime.trainer import TrainConfig

    launch_mod = importlib.import_module("plait.runtime.launch")  # the module (plait.runtime.launch is a function)

    calls: list[dict[str, Any]] = []

    def fake_launch(script: str, **kw: Any) -> SimpleNamespace:
        calls.append(kw)
        return SimpleNamespace(ranks=(), elapsed_s=0.0)

    monkeypatch.setattr(launch_mod, "launch", fake_launch)
    monkeypatch.setattr(launch_mod, "raise_on_failure", lambda result: None)
    monkeypatch.setenv(run_cmd.ADAPTIVE_ENV, "1")  # inherited from the shell: a run without --adaptive turns it off
    monkeypatch.setenv(run_cmd.INIT_BATCH_ENV, "7")
    script = tmp_path / "train.py"
    script.write_text("")

    def config(*args: str) -> TrainConfig:
        calls.clear()
        result = plait_in_process("run", str(script), "--nproc", "2", *args)
        assert result.returncode == 0, result.stderr
        (kw,) = calls
        for key in (run_cmd.ADAPTIVE_ENV, run_cmd.LR_SCALING_ENV, run_cmd.INIT_BATCH_ENV):  # the ranks' environment
            monkeypatch.setenv(key, kw["env"][key])
        return TrainConfig.from_env(steps=3)

    on = config("--adaptive", "--lr-scaling", "sqrt", "--init-batch-size", "16")
    assert (on.adaptive, on.lr_scaling, on.init_batch_size) == (True, "sqrt", 16)
    plain = config("--adaptive")
    assert (plain.adaptive, plain.lr_scaling, plain.init_batch_size) == (True, "auto", None)
    off = config()
    assert (off.adaptive, off.lr_scaling, off.init_batch_size) == (False, "auto", None)


def test_run_adaptive_option_errors(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("")
    result = plait_in_process("run", str(script), "--nproc", "1", "--lr-scaling", "linear")
    assert_one_clear_error(result, "only apply with --adaptive")
    result = plait_in_process("run", str(script), "--nproc", "1", "--adaptive", "--init-batch-size", "0")
    assert_one_clear_error(result, "--init-batch-size must be a positive number")
    result = plait_in_process("run", str(script), "--nproc", "1", "--adaptive", "--lr-scaling", "cubic")
    assert result.returncode == 2 and "cubic" in result.stderr


def test_run_adaptive_env_reaches_a_rank(tmp_path: Path) -> None:
    """One real rank (no torch import in it) reads the variables back."""
    script = tmp_path / "show.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path[:0] = {sys.path!r}
        from plait.runtime.envvars import adaptive_config_from_env
        print("CFG", sorted(adaptive_config_from_env().items()))
    """))
    result = plait_in_process("run", str(script), "--nproc", "1", "--adaptive", "--init-batch-size", "64")
    assert result.returncode == 0, result.stderr
    assert "CFG [('adaptive', True), ('init_batch_size', 64)]" in result.stdout
