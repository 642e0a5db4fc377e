"""Workloads (``name,time,application,num_replicas,batch_size`` CSVs) and the published results."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from plait.scheduler.decisions import SchedulerError
from plait.scheduler.sim.job import JobSpec
from plait.scheduler.sim.profiles import APP_SETTINGS, data_root

COLUMNS = ("name", "time", "application", "num_replicas", "batch_size")
PUBLISHED_POLICIES = ("pollux", "optimus", "tiresias")


def workload_path(name_or_path: str | Path) -> Path:
    """A workload file: a path, or a packaged name such as ``workload-6`` or ``6``."""
    text = str(name_or_path)
    path = Path(text)
    if path.is_file():
        return path
    stem = f"workload-{text}" if text.isdigit() else text.removesuffix(".csv")
    packaged = data_root() / "workloads" / f"{stem}.csv"
    if packaged.is_file():
        return packaged
    names = ", ".join(p.stem for p in packaged_workloads())
    raise SchedulerError(f"workload {text!r} is neither a file nor a packaged workload ({names})")


def packaged_workloads() -> list[Path]:
    """The 8 packaged Pollux workloads (160 jobs each), in order."""
    return sorted((data_root() / "workloads").glob("workload-*.csv"), key=lambda p: int(p.stem.split("-")[1]))


def load_workload(name_or_path: str | Path) -> list[JobSpec]:
    """Read a workload CSV into job specs, checking columns and applications."""
    path = workload_path(name_or_path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise SchedulerError(f"{path}: missing columns {missing}; a workload needs {', '.join(COLUMNS)}")
        specs = [_spec(path, i, row) for i, row in enumerate(reader, start=2)]
    if not specs:
        raise SchedulerError(f"{path}: the workload has no jobs")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise SchedulerError(f"{path}: job names must be unique")
    return specs


def _spec(path: Path, line: int, row: dict[str, str]) -> JobSpec:
    app = row["application"]
    if app not in APP_SETTINGS:
        raise SchedulerError(f"{path}:{line}: unknown application {app!r}; known: {', '.join(sorted(APP_SETTINGS))}")
    try:
        spec = JobSpec(name=row["name"], application=app, submission_time=int(float(row["time"])),
                       num_replicas=int(row["num_replicas"]), batch_size=int(row["batch_size"]))
    except ValueError as exc:
        raise SchedulerError(f"{path}:{line}: {exc}; time, num_replicas and batch_size must be numbers") from exc
    if spec.num_replicas < 1 or spec.batch_size < 1 or spec.submission_time < 0:
        raise SchedulerError(f"{path}:{line}: num_replicas and batch_size must be >= 1 and time >= 0")
    return spec


def _published(policy: str) -> dict[str, Any]:
    if policy not in PUBLISHED_POLICIES:
        raise SchedulerError(f"no published results for {policy!r}; there are {', '.join(PUBLISHED_POLICIES)}")
    path = data_root() / "results-jobload" / f"{policy}-1.0" / "summary.json"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def published_results(policy: str) -> dict[str, dict[str, float]]:
    """The artifact's JCTs for the packaged workloads: workload -> job -> JCT seconds."""
    return {w: {k: float(v) for k, v in jcts.items()} for w, jcts in _published(policy)["jcts"].items()}


def published_average(policy: str, workload: str) -> float:
    """The artifact's average JCT (s) of ``policy`` on a packaged workload such as ``workload-6``."""
    avgs = _published(policy)["avgs"]
    if workload not in avgs:
        raise SchedulerError(f"no published result for {workload!r}; there are {', '.join(sorted(avgs))}")
    return float(avgs[workload])
