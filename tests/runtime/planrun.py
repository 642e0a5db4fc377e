"""Run plans the way users get them (``plait.plan`` on a module) on forked gloo ranks with the Trainer, count the
collectives of one step, and compare with one plain process on the same global batches."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import plait
from plait.cluster import local_cluster
from plait.models import zoo_model
from plait.models.mlp import MLP, MLPConfig, mse_loss, regression_batch
from plait.plan import MeshSpec, Plan, plan_from_json, plan_to_json
from plait.runtime import TrainConfig, Trainer, TrainResult, init_distributed, run_ranks, teardown
from plait.runtime.collectives import CollectiveCounter

OPT = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01}
COUNTED_STEP = 1  # the collectives of this step are counted (step 0 may set up state)


def mlp6(hidden: int) -> MLPConfig:
    """Alpa's MLP: six dense layers of ``hidden`` features."""
    return MLPConfig(in_dim=hidden, hidden=hidden, num_layers=5, out_dim=hidden)


def model_parts(name: str) -> tuple[Callable[[], nn.Module], Callable[..., Any], Callable[..., torch.Tensor]]:
    """(build, make_batch, loss) of a zoo model, or of ``mlp6-H`` (Alpa's MLP of hidden H)."""
    if name.startswith("mlp6-"):
        cfg = mlp6(int(name.split("-")[1]))
        return (lambda: MLP(cfg)), (lambda n, **kw: regression_batch(cfg, n, **kw)), mse_loss
    zm = zoo_model(name)
    return zm.build, zm.make_batch, zm.loss


def make_plan(name: str, mesh: MeshSpec, global_batch: int, **kwargs: Any) -> Plan:
    """``plait.plan`` on the meta-device model for ``local:N`` on a fixed mesh (intra-op candidates only by default)."""
    build, make_batch, loss = model_parts(name)
    with torch.device("meta"):
        model = build()
    kwargs.setdefault("families", ("intra-op",))
    return plait.plan(model, make_batch(global_batch, device="meta"), local_cluster(mesh.size), global_batch=global_batch,
                      loss_fn=loss, meshes=[mesh], name=name, **kwargs)


def data_of(name: str, global_batch: int) -> Callable[[int], Sequence[torch.Tensor]]:
    """The global batch of each step, the same for every rank and for the reference."""
    make_batch = model_parts(name)[1]
    return lambda step: make_batch(global_batch, generator=torch.Generator().manual_seed(1000 + step))


def reference(name: str, global_batch: int, steps: int, *, autocast: bool = False) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One plain process: every step's loss and the final parameters."""
    build, _, loss_fn = model_parts(name)
    data = data_of(name, global_batch)
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.AdamW(model.parameters(), **OPT)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model, data(step))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


class CountingTrainer(Trainer):
    """The Trainer, counting the collectives of one step."""

    counts: Counter[tuple[str, tuple[str, ...]]]

    def _step(self, step: int, ctx: Any, applied: Any, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        if step != COUNTED_STEP:
            return super()._step(step, ctx, applied, optimizer)
        with CollectiveCounter(applied.mesh) as counter:
            loss = super()._step(step, ctx, applied, optimizer)
        self.counts = counter.counts
        return loss


def train_rank(name: str, plan_json: str, steps: int) -> dict[str, Any]:
    """One rank: the Trainer on the plan; losses, final full parameters (rank 0) and the counted step's collectives."""
    plan = plan_from_json(plan_json)
    build, _, loss_fn = model_parts(name)
    ctx = init_distributed()
    try:
        trainer = CountingTrainer(model_fn=build, loss_fn=loss_fn, data=data_of(name, plan.batch.global_size), plan=plan,
                                  config=TrainConfig(steps=steps, progress=False, **OPT), ctx=ctx)
        result = trainer.fit()
    finally:
        teardown()
    return {"losses": list(result.losses), "params": result.final_state, "counts": dict(trainer.counts)}


def fit_plan(name: str, plan_json: str, steps: int, **config: Any) -> tuple[Trainer, TrainResult]:
    """One rank: the Trainer on the plan with the tests' AdamW (``config``: more TrainConfig fields); its result."""
    plan = plan_from_json(plan_json)
    build, _, loss_fn = model_parts(name)
    ctx = init_distributed()
    try:
        trainer = Trainer(model_fn=build, loss_fn=loss_fn, data=data_of(name, plan.batch.global_size), plan=plan,
                          config=TrainConfig(steps=steps, progress=False, **OPT, **config), ctx=ctx)
        result = trainer.fit()
    finally:
        teardown()
    return trainer, result


def run_plan(name: str, plan: Plan, steps: int) -> dict[str, Any]:
    """Rank 0's results of training ``plan`` on its ranks."""
    results = run_ranks(train_rank, plan.world_size, name, plan_to_json(plan), steps)
    return results[0]


def planned_collectives(plan: Plan) -> Counter[tuple[str, tuple[str, ...]]]:
    """The collectives of one step of the plan's program, by (kind, axes)."""
    return Counter((i.collective or "", i.axes) for i in plan.programs[0].instrs if i.op == "collective")


def assert_pipeline_matches(results: Sequence[dict[str, Any]], dp: int, name: str, global_batch: int, steps: int, *,
                            loss_rtol: float = 1e-5, param_atol: float = 5e-6) -> None:
    """Pipeline ranks' results (``losses``: None off the last stage; ``params``: the stage's) against one plain
    process: the last stage's losses averaged over the ``dp`` replicas, and every parameter on some stage."""
    import pytest

    ref_losses, ref_params = reference(name, global_batch, steps)
    last = [r for r in results if r["losses"][0] is not None]
    assert len(last) == dp
    mean = [sum(r["losses"][k] for r in last) / dp for k in range(steps)]
    assert mean == pytest.approx(ref_losses, rel=loss_rtol)
    seen: set[str] = set()
    for r in results:
        for param, value in r["params"].items():
            torch.testing.assert_close(value, ref_params[param], rtol=0, atol=param_atol)
            seen.add(param)
    assert seen == set(ref_params)  # every parameter lives on some stage


def assert_trained_like_reference(got: dict[str, Any], name: str, global_batch: int, steps: int, *, first: int = 0,
                                  loss_rtol: float = 1e-5, param_atol: float = 5e-6) -> None:
    """One rank's Trainer result (``losses`` from step ``first``, ``params``: the whole model's final state) against
    one plain process."""
    import pytest

    ref_losses, ref_params = reference(name, global_batch, steps)
    assert got["losses"] == pytest.approx(ref_losses[first:], rel=loss_rtol)
    assert set(got["params"]) >= set(ref_params)
    for param, value in ref_params.items():
        torch.testing.assert_close(got["params"][param], value, atol=param_atol, rtol=0, msg=param)


def train_pipeline_steps(rank: Any, name: str, global_batch: int, steps: int) -> dict[str, Any]:
    """``steps`` AdamW steps of a pipeline rank (anything with ``params`` and ``step(batch)``) on ``name``'s
    global batches: each step's loss (None off the last stage) and the rank's final parameters."""
    opt = torch.optim.AdamW(list(rank.params.values()), **OPT)  # type: ignore[arg-type]
    data = data_of(name, global_batch)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        got = rank.step(data(step))
        opt.step()
        losses.append(None if got is None else float(got))
    return {"losses": losses, "params": {n: p.detach().clone() for n, p in rank.params.items()}}
