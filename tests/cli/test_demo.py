"""``plait demo`` end to end, shortened: plan, train on 2 ranks, reference, comparison, pictures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clikit import run_plait


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
