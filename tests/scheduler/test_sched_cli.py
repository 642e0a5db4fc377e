"""``plait sched sim`` end to end on a small workload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plait.cli.main import main

WORKLOAD = """name,time,application,num_replicas,batch_size
ncf-0,0,ncf,1,256
bert-0,30,bert,2,12
cifar10-0,100,cifar10,4,512
ncf-1,200,ncf,1,512
bert-1,400,bert,4,24
"""


@pytest.fixture
def workload(tmp_path: Path) -> Path:
    path = tmp_path / "small.csv"
    path.write_text(WORKLOAD)
    return path


def _run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_sim_writes_json_and_plots(workload: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = _run(["sched", "sim", "--workload", str(workload), "--policy", "tiresias", "--cluster", "2x4",
                 "--json", str(out / "r.json"), "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "average JCT" in text and "JCT by application" in text
    data = json.loads((out / "r.json").read_text())
    assert set(data["jct_by_job"]) == {"ncf-0", "bert-0", "cifar10-0", "ncf-1", "bert-1"}
    assert data["avg_jct"] == pytest.approx(sum(data["jct_by_job"].values()) / 5)
    assert data["makespan"] > 0 and 0 < data["gpu_utilization"] <= 1
    assert (out / "sched-small-jct-cdf.png").stat().st_size > 1000
    assert (out / "sched-small-utilization.png").stat().st_size > 1000


def test_compare_prints_policies_side_by_side(workload: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code = _run(["sched", "sim", "--workload", str(workload), "--policy", "pollux,tiresias,fifo", "--compare",
                 "--cluster", "2x4", "--interval", "120", "--no-plots", "--json", str(tmp_path / "c.json")])
    assert code == 0
    text = capsys.readouterr().out
    assert all(p in text for p in ("pollux", "tiresias", "fifo")) and "avg JCT vs best" in text
    data = json.loads((tmp_path / "c.json").read_text())
    assert [r["policy"] for r in data["results"]] == ["pollux", "tiresias", "fifo"]
    assert all(r["interval"] == 120 for r in data["results"])


@pytest.mark.parametrize("args,message", [
    (["--workload", "missing.csv"], "neither a file nor a packaged workload"),
    (["--workload", "6", "--policy", "gavel"], "unknown policy"),
    (["--workload", "6", "--cluster", "16by4"], "NODESxGPUS"),
    (["--workload", "6", "--policy", "pollux,fifo"], "add --compare"),
])
def test_user_mistakes_are_reported(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["sched", "sim", *args, "--no-plots"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag,target", [("--json", "r.json"), ("--out", "plots")])
def test_unwritable_output_fails_before_simulating(flag: str, target: str, workload: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = [flag, str(blocker / target)] + (["--no-plots"] if flag == "--json" else [])
    assert _run(["sched", "sim", "--workload", str(workload), "--policy", "tiresias", "--cluster", "2x4", *args]) == 2
    captured = capsys.readouterr()
    assert f"cannot write {flag} output {blocker / target}" in captured.err.replace("\n", "")
    assert "average JCT" not in captured.out


def test_output_check_leaves_no_file_behind(workload: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "r.json"
    assert _run(["sched", "sim", "--workload", str(workload), "--interval", "0", "--no-plots",
                 "--json", str(out)]) == 2
    assert not out.exists()


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["sched", "--help"]) == 0
    assert "sim" in capsys.readouterr().out
    assert _run(["sched", "sim", "--help"]) == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--workload", "--policy", "--cluster", "--interval", "--compare", "--json"))
