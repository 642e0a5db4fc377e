"""Checkpoints written atomically: a temporary directory renamed into place, then a ``latest`` pointer.

Layout under the run's output directory::

    checkpoints/step_00000010/state.pt   # full (unsharded) model, optimizer, step, RNG states
    checkpoints/latest                   # "step_00000010", written last

A reader never sees a half-written checkpoint: ``latest`` only ever names a complete directory.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from plait.errors import PlaitError
from plait.fileio import atomic_write, fsync_dir

STATE_FILE = "state.pt"
LATEST = "latest"
PREFIX = "step_"


def checkpoint_dir(out_dir: str | os.PathLike[str]) -> Path:
    """The checkpoint folder of a run's output directory."""
    return Path(out_dir) / "checkpoints"


def step_name(step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"{PREFIX}{step:08d}"


def save_checkpoint(root: Path, step: int, state: dict[str, Any], *, keep: int = 2) -> Path:
    """Write ``state`` as the checkpoint of ``step``, point ``latest`` at it and keep the newest ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(tmp / STATE_FILE, buf.getvalue())
    if final.exists():  # a resumed run taking the same step again
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write(root / LATEST, final.name)
    _prune(root, keep, final.name)
    return final


def _prune(root: Path, keep: int, current: str) -> None:
    """Keep the newest ``keep`` checkpoints up to ``current``; later ones belong to an abandoned run."""
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))
    older = [p for p in steps if p.name <= current]
    stale = [p for p in steps if p.name > current] + older[: max(0, len(older) - max(1, keep))]
    for old in stale:
        shutil.rmtree(old, ignore_errors=True)
    for temp in root.glob(".tmp-*"):  # left by a run killed while writing
        if not temp.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(temp, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The directory ``latest`` points at, or None when the run has no checkpoint yet."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    target = root / pointer.read_text().strip()
    if not (target / STATE_FILE).is_file():
        raise PlaitError(f"checkpoint pointer {pointer} names {target.name}, which is missing; delete {pointer} to start afresh")
    return target


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint's state on the CPU."""
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise PlaitError(f"checkpoint {path} cannot be read ({exc}); delete it or resume from an older one") from None
    if not isinstance(state, dict) or "step" not in state:
        raise PlaitError(f"{path} is not a plait checkpoint")
    return state
