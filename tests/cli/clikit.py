"""Helpers for the CLI tests: run ``plait`` in a fresh interpreter and check its error output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PLAIT = [sys.executable, "-m", "plait.cli"]


def run_plait(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``plait ARGS`` in a fresh interpreter and capture its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="120")
    return subprocess.run([*PLAIT, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def assert_one_clear_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Non-zero exit, an ``error:`` line naming the problem, and no traceback from plait itself.

    Lines a rank printed (prefixed ``[rank R]``) are the user's script's own output and may hold its traceback.
    """
    assert result.returncode != 0, result.stdout + result.stderr
    own_lines = [line for line in result.stderr.splitlines() if not line.startswith("[rank ")]
    assert not any("Traceback" in line for line in own_lines), result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
