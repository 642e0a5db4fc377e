"""The ``plait`` command end to end: help everywhere, and one clear message for each kind of bad input.

Most cases run the entry point's ``main`` in this process (``plait_in_process``: the same error handling and
exit codes, without a fresh interpreter's torch import); top-level help, an unknown preset and a failing rank
run ``python -m plait.cli`` in a fresh interpreter, so the real entry point's exit codes stay checked too.
"""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

import pytest
from clikit import assert_one_clear_error, plait_in_process, run_plait

from plait.cli.main import COMMANDS


def test_top_level_help_lists_every_subcommand() -> None:
    result = run_plait("--help")  # a fresh interpreter: the real entry point exits 0
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command: str) -> None:
    result = plait_in_process(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and "--help" in result.stdout


def test_unknown_preset_lists_known_ones() -> None:
    result = run_plait("plan", "mlp-tiny", "--cluster", "tpu-pod:4")  # a fresh interpreter: the real exit code
    assert_one_clear_error(result, "unknown cluster preset 'tpu-pod'", "dgx-a100", "local")


def test_malformed_cluster_file_names_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "lab.yaml"
    bad.write_text("num_nodes: 2\ndevices_per_node: 4\ndevice: {name: X, kind: cuda}\nlinks: {}\n")
    result = plait_in_process("plan", "mlp-tiny", "--cluster", str(bad))
    assert_one_clear_error(result, str(bad), "device")


def test_model_that_fits_no_plan_reports_smallest_memory() -> None:
    result = plait_in_process("plan", "gpt3-175b", "--cluster", "p3.16xlarge:1", "--batch", "8")
    assert_one_clear_error(result, "fits no plan", "limit")
    for kind in ("replicate", "fsdp"):
        assert kind in result.stderr
    # intra-op candidates are ruled out by their state alone, before any capture or ILP (seconds, not minutes)
    assert "intra-op tp=8: cannot fit: its parameters and optimizer state alone need 262.83 GB" in result.stderr


def test_script_raising_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import os, time
        rank = int(os.environ["RANK"])
        open(os.path.join({str(pids)!r}, str(os.getpid())), "w").close()
        if rank == 1:
            time.sleep(0.5)
            raise ValueError("bad batch on rank one")
        time.sleep(120)
    """))
    t0 = time.monotonic()
    result = run_plait("run", str(script), "--nproc", "3")
    assert time.monotonic() - t0 < 60
    assert_one_clear_error(result, "rank 1")
    assert "bad batch on rank one" in result.stderr
    started = [int(p.name) for p in pids.iterdir()]
    assert len(started) == 3
    for pid in started:
        assert not _alive(pid), f"rank process {pid} is still running"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def test_unwritable_output_is_one_clear_error() -> None:
    result = plait_in_process("plan", "mlp-tiny", "--cluster", "local:2", "--out", "/proc/no/such/dir/plan.json")
    assert_one_clear_error(result, "cannot access /proc/no")
