"""``plait demo`` end to end, shortened: plan, train on 2 ranks, reference, comparison, pictures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clikit import run_plait

from plait.cli import demo_cmd
from plait.cli.main import main
from plait.cluster import load_cluster
from plait.demo import DemoJob
from plait.plan.table import console_for_tables


@pytest.mark.slow
def test_demo_trains_matches_reference_and_writes_outputs(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = run_plait("demo", "--steps", "6", "--nproc", "2", "--no-profile", "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = result.stdout
    for needle in ("plait plan: demo-gpt on local:2", "candidates", "predicted step time", "measured step time", "matches reference"):
        assert needle in text, needle
    assert "check passed: plait on 2 ranks matches the single-process reference" in text
    for name in ("plan.json", "metrics.jsonl", "final.pt", "loss.png", "timeline.png"):
        assert (out / name).is_file(), name
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_demo_refuses_an_unusable_output_folder_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    def no_profiling(*args: object) -> None:
        raise AssertionError("the demo profiled the machine before checking its output folder")

    monkeypatch.setattr(demo_cmd, "_quick_profile", no_profiling)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as info:
        main(["demo", "--out", str(blocker / "demo")])
    assert info.value.code == 2
    assert f"cannot write to the output folder {blocker / 'demo'}" in capsys.readouterr().err


def test_demo_batch_splits_over_any_number_of_ranks(tmp_path: Path) -> None:
    assert DemoJob().global_batch == DemoJob.for_ranks(4, steps=1).global_batch == 32
    job = DemoJob.for_ranks(3, steps=1)
    plan = demo_cmd._plan(console_for_tables(120), job, load_cluster("local:3"), tmp_path)
    assert plan.world_size == 3 and plan.batch.global_size == 24
    assert (tmp_path / "plan.json").is_file() and (tmp_path / "timeline.png").is_file()


@pytest.mark.slow
def test_demo_adaptive_trains_with_the_goodput_batch_and_reports_it(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = run_plait("demo", "--adaptive", "--steps", "24", "--nproc", "2", "--no-profile", "--out", str(out),
                       timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = result.stdout
    for needle in ("adaptive batch: every 10 steps", "the batch over the run", "plait report"):
        assert needle in text, needle
    assert "matches reference" not in text  # the batch schedule is not the fixed reference's
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 25))
    assert all(r["goodput"] > 0 and r["batch_size"] >= 16 for r in records)
