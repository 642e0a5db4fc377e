"""plait.fileio.atomic_write: the one way plait replaces a file (plans, profiles, checkpoints, metrics)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from plait.fileio import atomic_write


def test_writes_whole_files_or_leaves_the_old_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "new" / "folder" / "plan.json"
    assert atomic_write(target, "first\n") == target  # the folder is created
    atomic_write(target, b"second")
    assert target.read_bytes() == b"second"

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, "third")
    assert target.read_bytes() == b"second"  # a failed write leaves the old file and no temporary one
    assert sorted(p.name for p in target.parent.iterdir()) == ["plan.json"]
