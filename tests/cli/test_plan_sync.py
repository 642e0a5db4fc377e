"""``plait plan --sync NAME``: the strategy's SyncSpecs are in the plan, its table and its JSON, and ``plait sim``
predicts the step the planner did (in process, through the CLI's entry point)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from plait.cli.main import main
from plait.plan import load_plan
from plait.plan.table import fmt_seconds

PLAN = ["plan", "mlp-tiny", "--cluster", "local:4", "--family", "data-parallel"]


def test_hybcomm_plan_holds_its_specs_and_sim_agrees(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    main([*PLAN, "--sync", "hybcomm", "--out", str(out)])
    shown = capsys.readouterr().out
    # K = 8 rows per worker, P = 4: SFB iff K <= 2MN/(P(M+N)): 32x32 layers (8) yes, 32x16 (5.3) and 8x32 (3.2) no
    assert "SFB over dp (4 parameters)" in shown
    plan = load_plan(out)
    kinds = {p.name: p.sync.kind for p in plan.params}
    assert kinds == {"layers.0.fc.weight": "ps", "layers.0.fc.bias": "ps", "layers.1.fc.weight": "sfb",
                     "layers.1.fc.bias": "sfb", "layers.2.fc.weight": "sfb", "layers.2.fc.bias": "sfb",
                     "out.weight": "ps", "out.bias": "ps"}
    assert plan.provenance is not None and plan.provenance.options["sync"] == "hybcomm"
    assert any(i.name == "sfb all_gather" for i in plan.programs[0].instrs)
    main(["sim", str(out)])
    simulated = capsys.readouterr().out
    assert plan.predicted is not None
    assert re.search(rf"│ step +│ {re.escape(fmt_seconds(plan.predicted.step_s))} ", simulated)
    assert "when planned" not in simulated  # sim shows it only when its step differs from the plan's prediction


def test_auto_sync_plan_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    main([*PLAN, "--sync", "auto", "--json"])
    spec = json.loads(capsys.readouterr().out)
    assert spec["provenance"]["options"]["sync"] == "auto"
    assert {p["sync"]["kind"] for p in spec["params"]} <= {"allreduce", "ps", "sfb"}


def test_unknown_sync_strategy_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*PLAN, "--sync", "nope"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "error: unknown sync strategy 'nope'; choose one of allreduce, ps, ps-load-balancing, partitioned-ps, " \
           "parallax, hybcomm, auto" in err
    assert "Traceback" not in err
