"""Golden plans: the chosen plan JSON for fixed (model, cluster) pairs, reviewed as diffs.

Regenerate after an intended change with ``PLAIT_UPDATE_GOLDEN=1 pytest tests/golden`` and review the diff.
Inputs are independent of this machine: presets with datasheet numbers, or a pinned cluster YAML.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from plait.cli.plan_cmd import resolve_model
from plait.cluster import load_cluster
from plait.plan import plan_from_json, plan_to_json
from plait.planners import plan

HERE = Path(__file__).parent
CASES = {
    "gpt2-small@dgx-a100-2": ("gpt2-small", "dgx-a100:2", 128),
    "mlp-small@local-pinned-4": ("mlp-small", str(HERE / "local4.yaml"), 256),
}
VOLATILE = ("created", "search_s", "passes")  # provenance that changes from run to run


def _normalise(raw: Any) -> Any:
    """Drop timings, round floats to 9 significant digits (last-bit noise), make paths relative."""
    if isinstance(raw, dict):
        return {k: _normalise(v) for k, v in raw.items() if k not in VOLATILE}
    if isinstance(raw, list):
        return [_normalise(v) for v in raw]
    if isinstance(raw, float):
        return float(f"{raw:.9g}")
    return raw


def _current(model: str, cluster_spec: str, global_batch: int) -> dict[str, Any]:
    cluster = load_cluster(cluster_spec)
    graph = resolve_model(model, global_batch // cluster.world_size)
    chosen = plan(graph, None, cluster, global_batch=global_batch)
    assert plan_from_json(plan_to_json(chosen)) == chosen
    result: dict[str, Any] = _normalise(json.loads(plan_to_json(chosen)))
    return result


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_plan(case: str) -> None:
    path = HERE / f"{case}.json"
    current = _current(*CASES[case])
    if os.environ.get("PLAIT_UPDATE_GOLDEN") == "1":
        path.write_text(json.dumps(current, indent=1) + "\n")
    if not path.is_file():
        pytest.fail(f"no golden plan {path.name}; create it with PLAIT_UPDATE_GOLDEN=1 pytest tests/golden")
    golden = json.loads(path.read_text())
    for key in golden:  # section by section, so a failure names the part of the plan that moved
        assert current.get(key) == golden[key], f"{case}: plan section {key!r} differs from {path.name}"
    assert set(current) == set(golden)
