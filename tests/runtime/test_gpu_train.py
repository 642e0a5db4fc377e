"""On a machine with CUDA: the demo model (gpt-tiny) trains on one GPU through the same runtime (NCCL)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from runkit import SCRIPTS, zoo_graph

from plait.cluster import load_cluster
from plait.plan import save_plan
from plait.planners import build_dp_plan
from plait.runtime import launch, read_metrics


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_demo_model_trains_on_one_gpu(tmp_path: Path) -> None:
    plan = build_dp_plan(zoo_graph("gpt-tiny"), load_cluster("h200:1"), kind="replicate", global_batch=8)
    plan_path = save_plan(plan, tmp_path / "plan.json")
    out = io.StringIO()
    result = launch(SCRIPTS / "train_zoo.py", nproc=1, plan=plan_path, out_dir=tmp_path / "run",
                    script_args=["--steps", "30", "--fixed-data"], stdout=out, timeout_s=300)
    assert result.ok, result.message
    assert "[rank 0] rank 0/1 on cuda:0 (nccl)" in out.getvalue()
    losses = [m.loss for m in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert len(losses) == 30
    assert losses[-1] < 0.5 * losses[0]  # on one fixed batch the loss falls from ~4.6 (measured on CPU: to 0.61)
