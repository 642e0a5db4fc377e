"""`plait plan --out` records its planning request; re-planning it for another size; `plait run --elastic` errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clikit import assert_one_clear_error, plait_in_process

from plait.cluster import load_cluster
from plait.errors import PlaitError
from plait.plan import load_plan, save_plan
from plait.planners import build_dp_plan
from plait.planners.request import PlanRequest, request_of, resize_cluster
from plait.runtime.elastic_launch import ELASTIC_DIR

SCRIPT = Path(__file__).resolve().parents[1] / "runtime" / "scripts" / "train_elastic.py"


def test_plait_plan_records_its_request_and_replans_it(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    result = plait_in_process("plan", "mlp-tiny", "--cluster", "local:4", "--family", "data-parallel", "--out", str(path))
    assert result.returncode == 0, result.stderr
    plan = load_plan(path)
    request = request_of(plan)
    assert request == PlanRequest(model="mlp-tiny", cluster="local:4", batch=32, family="data-parallel")  # 8 per rank
    again = request.resized(2).plan()
    assert again.world_size == 2 and again.batch.global_size == 32  # the global batch is kept
    assert request_of(again).world == 2 and request_of(again).batch == 32


def test_resized_clusters_and_meshes() -> None:
    a100 = load_cluster("dgx-a100:8")
    assert (resize_cluster(a100, 48).num_nodes, resize_cluster(a100, 48).devices_per_node) == (6, 8)
    assert (resize_cluster(a100, 4).num_nodes, resize_cluster(a100, 4).devices_per_node) == (1, 4)
    with pytest.raises(PlaitError, match="do not fill whole nodes of 8"):
        resize_cluster(a100, 12)
    assert resize_cluster(load_cluster("local:4"), 3).name == "local:3"
    request = PlanRequest(model="gpt-tiny", cluster="dgx-a100:8", mesh="2x4")
    assert request.resized(16).mesh == "dp=4,tp=4" and request.resized(6).mesh is None
    assert PlanRequest.from_json(request.to_json()) == request


def test_elastic_run_refuses_a_plan_without_request(tmp_path: Path) -> None:
    plan = save_plan(build_dp_plan(_graph(), load_cluster("local:2"), kind="replicate", global_batch=4), tmp_path / "p.json")
    result = plait_in_process("run", "--elastic", str(SCRIPT), "--plan", str(plan), "--out", str(tmp_path / "run"))
    assert_one_clear_error(result, "records no planning request", "plait plan MODEL --cluster C --batch B --out")
    assert not (tmp_path / "run" / ELASTIC_DIR).exists()  # refused before any rank started


def test_elastic_run_needs_plan_and_out(tmp_path: Path) -> None:
    result = plait_in_process("run", "--elastic", str(SCRIPT), "--nproc", "2")
    assert_one_clear_error(result, "--elastic needs --plan")
    result = plait_in_process("run", "--control", str(tmp_path / "c.json"), str(SCRIPT), "--nproc", "2")
    assert_one_clear_error(result, "--control only applies with --elastic")


def test_plan_request_errors_name_the_way_out() -> None:
    with pytest.raises(PlaitError, match="not one this plait reads"):
        PlanRequest.from_json(json.dumps({"model": "gpt-tiny"}))
    with pytest.raises(PlaitError, match="plan family 'tp' is not one of"):
        PlanRequest(model="gpt-tiny", cluster="local:2", family="tp")


def _graph():  # type: ignore[no-untyped-def]
    import torch

    from plait.graph import capture
    from plait.models import zoo_model

    zm = zoo_model("mlp-tiny")
    with torch.device("meta"):
        model = zm.build()
    return capture(model, zm.make_batch(2, device="meta"), name="mlp-tiny", loss_fn=zm.loss)
