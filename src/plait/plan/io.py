"""Plan JSON form (stable key order) and a readable table."""

from __future__ import annotations

import json
import os
from pathlib import Path

from plait.errors import PlaitError
from plait.fileio import atomic_write
from plait.plan.ir import PLAN_VERSION, Plan
from plait.serde import from_dict, to_dict


def plan_to_json(plan: Plan) -> str:
    """The plan's stable JSON text."""
    return json.dumps(to_dict(plan), indent=1, sort_keys=False) + "\n"


def plan_from_json(text: str) -> Plan:
    """Rebuild a plan from ``plan_to_json`` output."""
    raw = json.loads(text)
    if not isinstance(raw, dict):
        raise PlaitError(f"a plan is a JSON object, got a JSON {type(raw).__name__}; write one with `plait plan MODEL --out FILE`")
    version = raw.get("version")
    if isinstance(version, int) and version < PLAN_VERSION:
        raise PlaitError(
            f"this plan file is in format {version}, written by an older plait; this plait reads format {PLAN_VERSION} "
            "(placements, sync specs and precision per parameter instead of a data-parallel kind). "
            "Re-run `plait plan MODEL --cluster C --out FILE` to write it again"
        )
    if version != PLAN_VERSION:
        raise PlaitError(f"plan format version {version} is not supported (this plait reads {PLAN_VERSION}); re-run `plait plan`")
    return from_dict(Plan, raw)


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> Path:
    """Write the plan atomically (a temporary file, fsynced, renamed over the target)."""
    return atomic_write(path, plan_to_json(plan))


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read a plan written by ``save_plan`` or ``plait plan --out``."""
    source = Path(path)
    if not source.is_file():
        raise PlaitError(f"plan file {source} does not exist; write one with `plait plan MODEL --out {source}`")
    try:
        return plan_from_json(source.read_text())
    except (ValueError, TypeError, KeyError) as exc:
        raise PlaitError(f"plan file {source} is not a valid plait plan: {exc}") from None
