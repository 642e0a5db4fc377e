"""A plan written by ``plait plan --out`` is what ``plait run --plan`` executes (rule: a plan is data)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from clikit import run_plait

SCRIPT = Path(__file__).parents[1] / "runtime" / "scripts" / "train_zoo.py"


def test_planned_json_runs_on_the_ranks_it_names(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    planned = run_plait("plan", "gpt-tiny", "--cluster", "local:2", "--batch", "8", "--out", str(plan))
    assert planned.returncode == 0, planned.stderr
    spec = json.loads(plan.read_text())
    assert spec["mesh"]["shape"] == [2] and spec["batch"]["global_size"] == 8
    ran = run_plait("run", str(SCRIPT), "--plan", str(plan), "--out", str(tmp_path / "run"), "--", "--steps", "3")
    # stdout too: whether a rank that aborts does so after its last step (at exit) or during it
    assert ran.returncode == 0, ran.stderr[-2000:] + "\n--- stdout ---\n" + ran.stdout[-1500:]
    assert "[rank 1]" in ran.stdout and "done: 3 steps from step 0" in ran.stdout
    assert (tmp_path / "run" / "final.pt").is_file()


def test_intra_op_plan_written_by_plait_plan_runs_and_checkpoints(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    # gpt-mini: on this CPU cluster the ILP splits its layers (gpt-tiny's are too small to pay for the all-reduces)
    planned = run_plait("plan", "gpt-mini", "--cluster", "local:4", "--batch", "4", "--family", "intra-op", "--mesh", "2x2",
                        "--out", str(plan))
    assert planned.returncode == 0, planned.stderr
    assert "placements on the model axes (tp=2)" in planned.stdout
    spec = json.loads(plan.read_text())
    assert spec["mesh"] == {"shape": [2, 2], "axes": ["dp", "tp"]} and spec["activations"]
    assert any(p["placements"][1].startswith("Shard") for p in spec["params"])
    ran = run_plait("run", str(SCRIPT), "--plan", str(plan), "--out", str(tmp_path / "run"), "--", "--model", "gpt-mini", "--steps", "3",
                    "--ckpt-every", "2")
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "[rank 3]" in ran.stdout and "done: 3 steps from step 0" in ran.stdout
    final = torch.load(tmp_path / "run" / "final.pt")
    assert final["blocks.0.attn.qkv.weight"].shape == (3 * 128, 128)  # gathered back to full tensors
