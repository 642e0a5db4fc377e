"""The Trainer builds the plan's optimizer, reduces losses only at logged steps, and never leaves a rank
waiting when something fails on rank 0 alone."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from runkit import zoo_plan

from plait.cost.memory import OPTIMIZER_STATES
from plait.errors import PlaitError
from plait.models import zoo_model
from plait.plan.ir import Plan
from plait.runtime import TrainConfig, Trainer, init_distributed, read_metrics, run_ranks, teardown
from plait.runtime.optim import OPTIMIZERS, build_optimizer, optimizer_name

SHORT_S = 60.0  # a rank left waiting would fail the test in this time, not after the 300 s default


def fit(plan: Plan, ctx: Any, **config: Any) -> list[float]:
    """Train mlp-tiny on step-seeded data with ``plan``; the losses."""
    zm = zoo_model("mlp-tiny")

    def data(step: int):
        return zm.make_batch(plan.batch.global_size, generator=torch.Generator().manual_seed(3 + step))

    optimizer_fn = config.pop("optimizer_fn", None)
    cfg = TrainConfig(steps=config.pop("steps", 4), progress=False, **config)
    trainer = Trainer(model_fn=zm.build, loss_fn=zm.loss, data=data, plan=plan, config=cfg, ctx=ctx, optimizer_fn=optimizer_fn)
    return list(trainer.fit().losses)


def plain_sgd_losses(plan: Plan, steps: int) -> list[float]:
    """The same training in plain PyTorch with SGD without momentum."""
    zm = zoo_model("mlp-tiny")
    torch.manual_seed(0)
    model = zm.build()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, weight_decay=0.01)
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        loss = zm.loss(model, zm.make_batch(plan.batch.global_size, generator=torch.Generator().manual_seed(3 + step)))
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def optimizer_rank(plan: Plan) -> tuple[list[float], str]:
    """Train with the plan's optimizer, then try an optimizer_fn that contradicts the plan."""
    ctx = init_distributed(timeout_s=SHORT_S)
    try:
        losses = fit(plan, ctx)
        try:
            fit(plan, ctx, optimizer_fn=lambda params: torch.optim.AdamW(params))
        except PlaitError as exc:
            return losses, str(exc)
        return losses, "no error"
    finally:
        teardown()


def test_the_plan_picks_the_optimizer() -> None:
    assert set(OPTIMIZERS) == set(OPTIMIZER_STATES)  # the runtime builds every optimizer the planner estimates
    params = [torch.nn.Parameter(torch.zeros(2))]
    built = {name: build_optimizer(name, params, lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, momentum=0.5)
             for name in OPTIMIZERS}
    assert {name: type(opt).__name__ for name, opt in built.items()} == {
        "adamw": "AdamW", "adam": "Adam", "sgd": "SGD", "sgd_nomomentum": "SGD"}
    assert built["sgd"].defaults["momentum"] == 0.5 and built["sgd_nomomentum"].defaults["momentum"] == 0.0
    assert all(optimizer_name(opt) == name for name, opt in built.items())
    plan = replace(zoo_plan("mlp-tiny", "replicate", world=1, global_batch=4), optimizer="sgd_nomomentum")
    ((losses, error),) = run_ranks(optimizer_rank, 1, plan, timeout_s=2 * SHORT_S)
    assert losses == pytest.approx(plain_sgd_losses(plan, 4), rel=1e-6)
    assert "optimizer_fn built AdamW ('adamw') but the plan's memory estimate assumes 'sgd_nomomentum'" in error


def logging_rank(plan: Plan, out: str) -> tuple[list[float], list[float]]:
    """The same run logged every step and every third step (losses reduced only then)."""
    ctx = init_distributed(timeout_s=SHORT_S)
    try:
        return fit(plan, ctx, steps=5), fit(plan, ctx, steps=5, log_every=3, out_dir=out)
    finally:
        teardown()


def test_losses_of_unlogged_steps_are_kept(tmp_path: Path) -> None:
    plan = zoo_plan("mlp-tiny", "replicate", world=2, global_batch=8)
    (every, third), _ = run_ranks(logging_rank, 2, plan, str(tmp_path), timeout_s=2 * SHORT_S)
    assert len(every) == 5 and third == every
    assert [m.loss for m in read_metrics(tmp_path / "metrics.jsonl")] == pytest.approx(every, abs=1e-7)


def rank0_failure_rank(plan: Plan, out: str) -> list[str]:
    """Resume from a broken pointer, then checkpoint into a folder that is a file: each fails on rank 0 only."""
    ctx = init_distributed(timeout_s=SHORT_S)
    messages = []
    try:
        for config in ({"resume": True}, {"checkpoint_every": 1}):
            try:
                fit(plan, ctx, out_dir=str(Path(out) / next(iter(config))), **config)
                messages.append("no error")
            except PlaitError as exc:
                messages.append(str(exc))
        return messages
    finally:
        teardown()


def test_a_failure_on_rank_0_reaches_every_rank(tmp_path: Path) -> None:
    (tmp_path / "resume" / "checkpoints").mkdir(parents=True)
    (tmp_path / "resume" / "checkpoints" / "latest").write_text("step_00000009")
    (tmp_path / "checkpoint_every").mkdir()
    (tmp_path / "checkpoint_every" / "checkpoints").write_text("a file where the folder should be")
    plan = zoo_plan("mlp-tiny", "replicate", world=2, global_batch=8)
    rank0, rank1 = run_ranks(rank0_failure_rank, 2, plan, str(tmp_path), timeout_s=2 * SHORT_S)
    assert rank0 == rank1
    resume, save = rank0
    assert resume.startswith("finding the checkpoint to resume from failed on rank 0: checkpoint pointer")
    assert "names step_00000009, which is missing" in resume
    assert save.startswith("writing the checkpoint of step 1 failed on rank 0: FileExistsError")
