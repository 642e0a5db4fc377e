"""A plan written by ``plait plan --out`` is what ``plait run --plan`` executes (rule: a plan is data)."""

from __future__ import annotations

import json
from pathlib import Path

from clikit import run_plait

SCRIPT = Path(__file__).parents[1] / "runtime" / "scripts" / "train_zoo.py"


def test_planned_json_runs_on_the_ranks_it_names(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    planned = run_plait("plan", "gpt-tiny", "--cluster", "local:2", "--batch", "8", "--out", str(plan))
    assert planned.returncode == 0, planned.stderr
    spec = json.loads(plan.read_text())
    assert spec["mesh"]["shape"] == [2] and spec["batch"]["global_size"] == 8
    ran = run_plait("run", str(SCRIPT), "--plan", str(plan), "--out", str(tmp_path / "run"), "--", "--steps", "3")
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "[rank 1]" in ran.stdout and "done: 3 steps from step 0" in ran.stdout
    assert (tmp_path / "run" / "final.pt").is_file()
