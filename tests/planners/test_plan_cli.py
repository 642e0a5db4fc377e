"""`plait plan` and `plait sim` end to end (in-process), with their error messages."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from plait.cli.main import main
from plait.plan import load_plan, plan_from_json

CLUSTER = str(Path(__file__).parents[1] / "golden" / "local4.yaml")


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI; returns (exit code, stdout, stderr)."""
    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_then_sim(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    code, text, err = run(["plan", "mlp-tiny", "--cluster", CLUSTER, "--batch", "32", "--out", str(out)], capsys)
    assert code == 0, err
    assert "plait plan: mlp-tiny on local-pinned:4" in text and "candidates" in text and "chosen" in text
    plan = load_plan(out)
    assert plan.batch.global_size == 32 and plan.mesh.size == 4 and len(plan.candidates) == 10
    families = [c.family for c in plan.candidates]
    assert families.count("intra-op") == 3 and families.count("pipeline") == 1  # dp=2 x tp=2 (replicate, fsdp), tp=4
    png = tmp_path / "timeline.png"
    code, text, err = run(["sim", str(out), "--timeline", str(png)], capsys)
    assert code == 0, err
    assert plan.predicted is not None
    assert "step" in text and "overlap" in text and "peak memory, ranks 0-" in text
    assert f"{plan.predicted.step_s * 1e3:.1f} ms" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    code, _, err = run(["sim", str(out), "--profile", str(tmp_path / "no-profile.json")], capsys)
    assert code == 2 and "profile" in err


def test_plan_carries_its_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A plan made with --profile keeps it: `plait sim` then predicts the same step, not a datasheet one."""
    from plait.cluster import load_cluster
    from plait.cost import CostModel, load_profile, save_profile
    from plait.sim import simulate

    profile = save_profile(load_profile("h200"), tmp_path / "mine.json")
    out = tmp_path / "plan.json"
    # --family pipeline: the full search chooses this same pipeline plan (only the plan's list of candidates differs);
    # scoring the other families (the intra-op ILP on 5 meshes) would take most of this test's time
    code, _, err = run(["plan", "gpt-tiny", "--cluster", "dgx-a100:1", "--profile", str(profile), "--family", "pipeline",
                        "--out", str(out)], capsys)
    assert code == 0, err
    plan = load_plan(out)
    assert plan.cluster.profile == str(profile.resolve()) and plan.predicted is not None
    assert simulate(plan, CostModel(plan.cluster)).prediction.step_s == pytest.approx(plan.predicted.step_s, rel=1e-12)
    datasheet = simulate(plan, CostModel(load_cluster("dgx-a100:1")))  # what sim did before: another answer
    assert abs(datasheet.prediction.step_s / plan.predicted.step_s - 1) > 0.05
    code, text, err = run(["sim", str(out)], capsys)
    assert code == 0 and "when planned" not in text
    assert CostModel(plan.cluster).source.startswith("profile of")


def test_plan_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    code, text, err = run(["plan", "mlp-tiny", "--cluster", CLUSTER, "--micro-batch", "2", "--json"], capsys)
    assert code == 0, err
    plan = plan_from_json(text)
    assert (plan.batch.micro_size, plan.batch.global_size) == (2, 8)


def test_plan_from_a_factory(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def small():\n"
        "    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))\n"
        "    return model, torch.empty(4, 8, device='meta')\n"
        "def broken():\n"
        "    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code, text, err = run(["plan", "my_models:small", "--cluster", CLUSTER, "--json"], capsys)
    assert code == 0, err
    plan = json.loads(text)
    assert plan["model"]["name"] == "small" and plan["batch"]["global_size"] == 16
    code, _, err = run(["plan", "my_models:broken", "--cluster", CLUSTER], capsys)
    assert code == 2 and "must return (model, example_batch)" in err
    code, _, err = run(["plan", "my_models:nope", "--cluster", CLUSTER], capsys)
    assert code == 2 and "has no callable 'nope'" in err
    code, _, err = run(["plan", "no_such_module_xyz:f", "--cluster", CLUSTER], capsys)
    assert code == 2 and "cannot import 'no_such_module_xyz'" in err
    sys.modules.pop("my_models", None)


def test_plan_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["plan", "gpt-9000", "--cluster", CLUSTER], capsys)
    assert code == 2 and "unknown model 'gpt-9000'" in err and "gpt2-small" in err and "module.path:factory" in err
    code, _, err = run(["plan", "mlp-tiny", "--cluster", "nowhere:3"], capsys)
    assert code == 2 and "unknown cluster preset" in err
    # a batch that does not split over every rank rules out the data-parallel candidates only (dp=2 x tp=2 splits it)
    code, _, err = run(["plan", "mlp-tiny", "--cluster", CLUSTER, "--batch", "30", "--family", "data-parallel"], capsys)
    assert code == 2 and "does not split over 4 data-parallel ranks (a multiple of 4 would)" in err
    code, _, err = run(["plan", "gpt3-175b", "--cluster", CLUSTER, "--batch", "4"], capsys)
    assert code == 2 and "fits no plan" in err and "fsdp, unit = layer: needs" in err


def test_sim_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["sim", str(tmp_path / "missing.json")], capsys)
    assert code == 2 and "does not exist" in err and "plait plan" in err
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 2, "model": 3}')
    code, _, err = run(["sim", str(bad)], capsys)
    assert code == 2 and "not a valid plait plan" in err
    bad.write_text("not json")
    code, _, err = run(["sim", str(bad)], capsys)
    assert code == 2 and "not a valid plait plan" in err
