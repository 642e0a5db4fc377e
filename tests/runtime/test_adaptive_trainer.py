"""Adaptive training in the Trainer (issue 10).

* Off (the default) is today's Trainer: bit-identical to the steps it always ran, and nothing is installed.
* On with a fixed batch the learning-rate factor and gain are exactly 1, so training is bit-identical to off,
  while the noise scale is estimated (replicated buckets, FSDP2, a 2-stage x 2-replica pipeline).
* On linear regression with known noise the Trainer's estimate is within 10 % of the exact noise scale
  (replicated on 2 ranks; FSDP2 and one rank with accumulation also checked).
* Checkpoints carry the estimator and progress: a resumed run ends with the same statistics.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from runkit import zoo_plan
from torch import nn
from torch.distributed.fsdp import FSDPModule

from plait.cluster import local_cluster
from plait.cost import CostModel
from plait.errors import PlaitError
from plait.graph import capture
from plait.models import zoo_model
from plait.plan import Plan
from plait.planners import build_dp_plan
from plait.planners.pipeline import PipelineOptions, plan_pipeline
from plait.planners.pipeline_plan import build_pipeline_plan
from plait.runtime import (
    TrainConfig,
    Trainer,
    apply_plan,
    checkpoint_dir,
    init_distributed,
    load_checkpoint,
    read_metrics,
    run_ranks,
    teardown,
)
from plait.runtime.optim import build_optimizer
from plait.runtime.state import seed_rank

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adaptive"))
from gns_problem import DIM, make_problem  # noqa: E402

NAME, GLOBAL, STEPS = "mlp-tiny", 256, 6  # large enough a batch for the estimate to settle in a few steps
OPT: dict[str, Any] = {"lr": 1e-2, "eps": 1e-6, "progress": False}
ADAPTIVE_KEYS = {"batch_size", "noise_scale", "efficiency", "gain", "lr_factor", "progress"}


def _data(plan: Plan) -> Callable[[int], Sequence[torch.Tensor]]:
    zm = zoo_model(NAME)
    return lambda step: zm.make_batch(plan.batch.global_size, generator=torch.Generator().manual_seed(11 + step))


def _fit(plan: Plan, ctx: Any, **config: Any) -> tuple[Trainer, Any]:
    zm = zoo_model(NAME)
    trainer = Trainer(model_fn=zm.build, loss_fn=zm.loss, data=_data(plan), plan=plan, ctx=ctx,
                      config=TrainConfig(**{"steps": STEPS, **OPT, **config}))
    return trainer, trainer.fit()


def _hand_loop(plan: Plan, ctx: Any) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The fixed-batch Trainer's steps written out: apply the plan, then zero, forward-backward, reduce, step."""
    zm = zoo_model(NAME)
    torch.manual_seed(0)
    applied = apply_plan(zm.build(), plan, ctx)
    seed_rank(0, step=0, rank=ctx.rank)
    optimizer = build_optimizer(plan.optimizer, applied.trained_parameters(), lr=OPT["lr"], betas=(0.9, 0.999),
                                eps=OPT["eps"], weight_decay=0.01, momentum=0.9)
    losses = []
    for step in range(STEPS):
        applied.zero_grad(optimizer)
        loss = applied.forward_backward(_data(plan)(step), zm.loss)
        applied.before_optimizer_step()
        optimizer.step()
        torch.distributed.all_reduce(loss)
        losses.append(loss.item() / ctx.world_size)
    return losses, applied.full_model_state()


def _installed(trainer: Trainer) -> list[str]:
    """What adaptive training installs, found on the trainer's applied plan."""
    applied = trainer.applied
    assert applied is not None
    found = []
    if trainer.tracker is not None:
        found.append("tracker")
    probe = getattr(applied, "probe", None)
    if probe is not None:
        found.append("applied.probe")
        if probe.preconditioner is not None:
            found.append("adam.preconditioner")
    if applied.replicate is not None and applied.replicate.probe is not None:
        found.append("wfbp.probe")
    rank = getattr(applied, "rank", None)
    if rank is not None and rank.probe is not None:
        found.append("pipeline.probe")
    if rank is not None and any("backward_one_chunk" in vars(stage) for stage in rank.stages):
        found.append("pipeline.stage_hooks")
    fsdp_units = [m for m in applied.model.modules() if isinstance(m, FSDPModule)]
    comms = {type(g._reduce_scatter_comm).__name__ for m in fsdp_units for g in m._get_fsdp_state()._fsdp_param_groups}
    if comms - {"DefaultReduceScatter"}:
        found.append("fsdp.reduce_scatter")
    return found


def _run_off_and_on(plan: Plan, out: str | None = None, plain: bool = False) -> dict[str, Any]:
    """One rank: the plan off and on (and, on the replicated plan, written out by hand); ``plain``: the noise scale
    of the unweighted gradients on every plan (by default a replicated AdamW plan measures it in Adam's metric)."""
    ctx = init_distributed()
    try:
        off_trainer, off = _fit(plan, ctx)
        on_trainer, on = _fit(plan, ctx, adaptive=True, out_dir=out, **({"gns_preconditioned": False} if plain else {}))
        hand = _hand_loop(plan, ctx) if plan.buckets else None
        return {"off": (list(off.losses), off.final_state), "on": (list(on.losses), on.final_state),
                "hand": hand, "off_installed": _installed(off_trainer), "on_installed": _installed(on_trainer),
                "stats": on.adaptive, "state": on.adaptive_state, "note": on_trainer.tracker_note}
    finally:
        teardown()


def _assert_identical(a: tuple[list[float], dict[str, torch.Tensor]], b: tuple[list[float], dict[str, torch.Tensor]]) -> None:
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for name, tensor in a[1].items():
        assert torch.equal(tensor, b[1][name]), name


def _assert_estimates(result: dict[str, Any]) -> None:
    stats = result["stats"]
    assert len(stats) == STEPS and all(s.gain == 1.0 and s.lr_factor == 1.0 and s.efficiency == 1.0 for s in stats)
    assert [s.progress for s in stats] == [float(i + 1) for i in range(STEPS)]
    assert stats[0].noise_scale == 0.0  # one step behind: nothing known at the first step
    assert result["state"]["gns"]["num_updates"] == STEPS and result["note"] == ""
    sqr, trace = (b / w for b, w in (result["state"]["gns"]["sqr"], result["state"]["gns"]["trace"]))
    assert sqr > 0 and trace > 0 and math.isfinite(trace / sqr)


def test_off_is_todays_trainer_and_on_with_a_fixed_batch_trains_identically(tmp_path: Path) -> None:
    replicated = zoo_plan(NAME, "replicate", world=2, global_batch=GLOBAL, bucket_bytes=4096)
    fsdp = zoo_plan(NAME, "fsdp", world=2, global_batch=GLOBAL, micro_batch=GLOBAL // 4)
    assert len(replicated.buckets) > 1 and fsdp.batch.num_micro == 2
    for plan, out in ((replicated, str(tmp_path / "replicated")), (fsdp, None)):
        result = run_ranks(_run_off_and_on, 2, plan, out, timeout_s=120)[0]
        assert result["off_installed"] == []
        if result["hand"] is not None:
            _assert_identical(result["off"], result["hand"])
        _assert_identical(result["off"], result["on"])
        assert set(result["on_installed"]) >= {"tracker", "applied.probe"}
        assert ("wfbp.probe" if plan.buckets else "fsdp.reduce_scatter") in result["on_installed"]
        # gns_preconditioned="auto": AdamW's metric on the replicated plan only
        assert ("adam.preconditioner" in result["on_installed"]) == bool(plan.buckets)
        _assert_estimates(result)
    lines = [json.loads(line) for line in (tmp_path / "replicated" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == STEPS and all(set(line) >= ADAPTIVE_KEYS for line in lines)
    assert [m.batch_size for m in read_metrics(tmp_path / "replicated" / "metrics.jsonl")] == [GLOBAL] * STEPS


def _pipeline_plan(world: int) -> Plan:
    """mlp-tiny as 2 stages (1F1B, 2 micro-batches) on ``world`` ranks (2 x ``world // 2`` replicas)."""
    zm = zoo_model(NAME)
    with torch.device("meta"):
        model = zm.build()
    graph = capture(model, zm.make_batch(GLOBAL // 2, device="meta"), name=NAME, loss_fn=zm.loss, with_ops=False)
    cluster = local_cluster(world)
    cost = CostModel(cluster)
    options = PipelineOptions(same_size=True, min_stages=2, micro_batches=(2,), tp_sizes=(1,))
    choice = plan_pipeline(graph, cluster, global_batch=GLOBAL, cost=cost, options=options)
    return build_pipeline_plan(graph, cluster, choice, global_batch=GLOBAL, cost=cost, schedule="1f1b")


@pytest.mark.parametrize("replicas", [2, 1])
def test_a_pipeline_with_adaptivity_on_trains_identically_and_measures_what_one_process_does(replicas: int) -> None:
    # two replicas: the stages' gradients around their data-parallel average, as replicated buckets on 2 ranks;
    # one replica: each stage's first micro-batch gradient and the step's, as one rank accumulating 2 micro-batches
    plan = _pipeline_plan(2 * replicas)
    assert plan.mesh.shape == (2, replicas) and plan.mesh.axes == ("pp", "dp") and plan.schedule.num_microbatches == 2
    results = run_ranks(_run_off_and_on, 2 * replicas, plan, None, timeout_s=120)
    for result in results:
        assert result["off_installed"] == [] and "pipeline.probe" in result["on_installed"]
        assert ("pipeline.stage_hooks" in result["on_installed"]) == (replicas == 1)
        _assert_identical(result["off"], result["on"])
        _assert_estimates(result)
    assert len({r["state"]["gns"]["sqr"][0] for r in results}) == 1  # every rank holds the same statistics
    same = zoo_plan(NAME, "replicate", world=replicas, global_batch=GLOBAL, micro_batch=GLOBAL // 2 if replicas == 1 else None)
    assert same.batch.micro_size == GLOBAL // 2
    _assert_close_states(results[0]["state"], run_ranks(_run_off_and_on, replicas, same, None, True)[0]["state"])


# ---- the estimate on a problem whose noise scale is known ----------------------------------------------------


class LinearModel(nn.Module):
    """``x . w`` with ``w`` the linear-regression problem's point, where its gradient statistics are exact."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(make_problem().w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The predictions."""
        return x @ self.w


def linear_loss(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """Half the mean squared error (the problem's loss)."""
    return 0.5 * ((model(batch[0]) - batch[1]) ** 2).mean()


def _linear_plan(kind: str, world: int, global_batch: int, num_micro: int) -> Plan:
    graph = capture(LinearModel(), make_problem().batch(torch.Generator().manual_seed(0), 4), name="linreg",
                    loss_fn=linear_loss, with_ops=False)
    return build_dp_plan(graph, local_cluster(world), kind=kind, global_batch=global_batch,  # type: ignore[arg-type]
                         num_micro=num_micro, optimizer="sgd_nomomentum")


def _estimate_rank(plan: Plan, steps: int, seed: int) -> float:
    """Train with a zero learning rate (the point stays where the truth is known); the Trainer's noise scale."""
    problem = make_problem()

    def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return problem.batch(torch.Generator().manual_seed(seed * 100_000 + step), plan.batch.global_size)

    ctx = init_distributed()
    try:
        config = TrainConfig(steps=steps, lr=0.0, weight_decay=0.0, progress=False, adaptive=True, log_every=steps)
        trainer = Trainer(model_fn=LinearModel, loss_fn=linear_loss, data=data, plan=plan, config=config, ctx=ctx)
        trainer.fit()
        assert trainer.tracker is not None
        return trainer.tracker.gns.noise_scale
    finally:
        teardown()


@pytest.mark.parametrize(("kind", "world", "num_micro", "steps"), [
    ("replicate", 2, 1, 500),  # the bucket buffer before and after its all-reduce
    ("fsdp", 2, 2, 300),  # FSDP2's reduce-scatter input per micro-batch, and the gradient shards
    ("replicate", 1, 4, 300),  # one rank: the first of 4 accumulated micro-batches against their mean
])
def test_the_noise_scale_of_linear_regression_is_within_10_percent(kind: str, world: int, num_micro: int, steps: int) -> None:
    truth = make_problem().truth().noise_scale
    plan = _linear_plan(kind, world, 128, num_micro)
    assert plan.batch.num_micro == num_micro and plan.model.num_params == DIM
    got = run_ranks(_estimate_rank, world, plan, steps, 1, timeout_s=120)
    assert got[0] == pytest.approx(truth, rel=0.10)
    assert all(g == got[0] for g in got)


# ---- checkpoints ---------------------------------------------------------------------------------------------


def _checkpoint_rank(plan: Plan, out: str, steps: int, resume: bool, weighted: bool) -> dict[str, Any]:
    ctx = init_distributed()
    try:
        _, result = _fit(plan, ctx, steps=steps, adaptive=True, out_dir=out, checkpoint_every=2, resume=resume,
                         gns_preconditioned="auto" if weighted else False)
        return {"start": result.start_step, "state": result.adaptive_state, "losses": list(result.losses),
                "stats": result.adaptive}
    finally:
        teardown()


@pytest.mark.parametrize("weighted", [False, True])
def test_a_checkpoint_restores_the_statistics(tmp_path: Path, weighted: bool) -> None:
    # Adam-weighted norms (the default for AdamW) too: both runs read the weights afresh at the checkpoint
    plan = zoo_plan(NAME, "replicate", world=2, global_batch=GLOBAL)
    whole = run_ranks(_checkpoint_rank, 2, plan, str(tmp_path / "whole"), 4, False, weighted)[0]
    first = run_ranks(_checkpoint_rank, 2, plan, str(tmp_path / "split"), 2, False, weighted)[0]
    rest = run_ranks(_checkpoint_rank, 2, plan, str(tmp_path / "split"), 4, True, weighted)[0]
    assert rest["start"] == 2 and first["state"]["gns"]["num_updates"] == 2
    assert rest["state"]["gns"]["num_updates"] == 4 and rest["state"]["progress"] == {"iterations": 4.0, "steps": 4}
    _assert_close_states(rest["state"], whole["state"])
    assert [s.noise_scale for s in rest["stats"]] == pytest.approx([s.noise_scale for s in whole["stats"][2:]], rel=1e-6)
    saved = load_checkpoint(checkpoint_dir(tmp_path / "split") / "step_00000004")
    assert saved["adaptive"]["gns"]["num_updates"] == 4


def _assert_close_states(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two tracker states equal up to float rounding."""
    ga, gb = a["gns"], b["gns"]
    assert ga["num_updates"] == gb["num_updates"] and a["progress"] == b["progress"]
    for key in ("sqr", "trace"):
        assert ga[key] == pytest.approx(gb[key], rel=1e-6)


def _rules_rank(plan: Plan) -> dict[str, Any]:
    ctx = init_distributed()
    try:
        out: dict[str, Any] = {"doubled": _fit(plan, ctx, lr=2 * OPT["lr"])[1]}
        for rule in ("linear", "adascale"):  # the statistics of every step from the next step on
            trainer, result = _fit(plan, ctx, adaptive=True, init_batch_size=GLOBAL // 2, lr_scaling=rule,
                                   gns_reduce_every=1)
            assert trainer.optimizer is not None
            out[rule] = (result, trainer.optimizer.param_groups[0]["lr"])
        return out
    finally:
        teardown()


def test_a_batch_larger_than_the_initial_one_scales_the_learning_rate_by_the_rule() -> None:
    plan = zoo_plan(NAME, "replicate", world=1, global_batch=GLOBAL, micro_batch=GLOBAL // 2)
    got = run_ranks(_rules_rank, 1, plan)[0]
    (linear, linear_lr), (ada, ada_lr) = got["linear"], got["adascale"]
    assert linear_lr == ada_lr == OPT["lr"]  # the configured rate is back after every step
    _assert_identical((list(linear.losses), linear.final_state), (list(got["doubled"].losses), got["doubled"].final_state))
    assert [s.lr_factor for s in linear.adaptive] == [2.0] * STEPS
    gains = [s.gain for s in ada.adaptive]
    assert gains[0] == 1.0 and all(1.0 < g <= 2.0 for g in gains[1:])  # no statistics yet at the first step
    assert [s.lr_factor for s in ada.adaptive] == gains
    assert [s.efficiency for s in ada.adaptive] == pytest.approx([g / 2 for g in gains])
    assert [s.progress for s in ada.adaptive] == pytest.approx(list(itertools.accumulate(gains)))


def _reduce_every_rank(plan: Plan) -> dict[int, Any]:
    ctx = init_distributed()
    try:
        return {k: _fit(plan, ctx, adaptive=True, gns_reduce_every=k)[1] for k in (1, 4)}
    finally:
        teardown()


def test_norms_summed_a_few_steps_at_a_time_give_the_same_statistics_later() -> None:
    plan = zoo_plan(NAME, "replicate", world=2, global_batch=GLOBAL)
    got = run_ranks(_reduce_every_rank, 2, plan)
    for ranks in got:
        every, batched = ranks[1], ranks[4]
        _assert_identical((list(every.losses), every.final_state), (list(batched.losses), batched.final_state))
        _assert_close_states(batched.adaptive_state, every.adaptive_state)  # the same steps, folded in later
        assert [s.noise_scale for s in batched.adaptive][:5] == [0.0] * 4 + [every.adaptive[4].noise_scale]
    assert got[0][4].adaptive_state == got[1][4].adaptive_state  # every rank folds the same steps at once


def test_bad_adaptive_settings_are_plait_errors() -> None:
    with pytest.raises(PlaitError, match="lr_scaling 'fast' is not a rule"):
        TrainConfig(steps=1, adaptive=True, lr_scaling="fast")
    with pytest.raises(PlaitError, match="gns_smoothing"):
        TrainConfig(steps=1, adaptive=True, gns_smoothing=1.0)
    with pytest.raises(PlaitError, match="init_batch_size"):
        TrainConfig(steps=1, adaptive=True, init_batch_size=0)
    with pytest.raises(PlaitError, match="gns_reduce_every is 0"):
        TrainConfig(steps=1, adaptive=True, gns_reduce_every=0)
