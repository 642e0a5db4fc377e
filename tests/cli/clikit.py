"""Helpers for the CLI tests: run ``plait`` (in a fresh interpreter or in this process) and check its error output."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

PLAIT = [sys.executable, "-m", "plait.cli"]
COLUMNS = "120"


def run_plait(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``plait ARGS`` in a fresh interpreter and capture its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS=COLUMNS)
    return subprocess.run([*PLAIT, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def plait_in_process(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``plait ARGS`` in this process, the way the ``plait`` entry point does, and capture its output.

    It calls ``plait.cli.main.main`` (what ``plait`` and ``python -m plait.cli`` run), so errors go through the
    entry point's own handling: one ``error:`` line and ``SystemExit`` with the exit code. The exit status is
    what the interpreter would make of it, and an exception that escapes ``main`` becomes a traceback on stderr
    and status 1, as in a fresh interpreter. The same result as ``run_plait`` without the seconds of a fresh
    interpreter's torch import; keep ``run_plait`` for what needs a process of its own (ranks, signals).
    """
    from plait.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with _environ(COLUMNS=COLUMNS), contextlib.chdir(cwd or Path.cwd()), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exc:
            code = _exit_status(exc.code, err)
        except Exception:
            traceback.print_exc(file=err)
            code = 1
    return subprocess.CompletedProcess([*PLAIT, *args], code, out.getvalue(), err.getvalue())


def _exit_status(code: object, err: io.StringIO) -> int:
    """The process exit status ``sys.exit(code)`` gives: 0 for None, the int, else 1 after printing it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=err)
    return 1


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for the block, then put back what was there."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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
