"""The Trainer runs plans whose SyncSpecs name a parameter server, SFB or a compressed all-reduce through
``plait.runtime.sync``, matches one process, and records each step's bytes in the metrics file.

One launch of 4 forked gloo ranks trains the tiny MLP of test_sync_kit (16 -> 32 -> 32 -> 8, K = 4 rows per
worker) for 5 steps with three plans made by ``apply_sync`` on the planner's replicated data-parallel plan:

- ``ps`` (every parameter whole on a server, round-robin, s = 0) and ``hybcomm`` (fc1 and fc2 by SFB,
  2K(P1-1)(M+N) <= 2MN(P1+P2-2)/P2; fc3 on a server), AdamW: losses and parameters as one process, to the tolerances
  of test_sync_equivalence (the same sums in another order);
- ``allreduce:compress=bf16``, plain SGD: parameters within 2 * lr * sum_t n * u * max|g_t| (u = 2^-8) of one
  process, and the metrics hold the compressed byte count (half of the plain ring's) on every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from test_sync_kit import GLOBAL_BATCH, IN, OUT, WORLD, Net, batch, loss_of
from torch import nn

from plait.cluster import local_cluster
from plait.errors import PlaitError
from plait.graph.capture import capture
from plait.graph.model_graph import ModelGraph
from plait.plan import Plan, plan_from_json, plan_to_json
from plait.planners import build_dp_plan
from plait.planners.sync_lowering import apply_sync
from plait.runtime import TrainConfig, Trainer, init_distributed, run_ranks, teardown
from plait.runtime.apply import PlanMismatchError, apply_plan, uses_runtime_sync
from plait.runtime.context import DistContext
from plait.runtime.metrics import METRICS_FILE, read_metrics

STEPS = 5
K = GLOBAL_BATCH // WORLD
ADAMW = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01}
SGD = {"lr": 0.1, "weight_decay": 0.0}
RTOL = 1e-5  # losses of the synchronous kinds (test_sync_equivalence measured <= 1.1e-7 relative)
PARAM_ATOL = 1e-6  # their parameters after 5 AdamW steps (measured there: <= 8.2e-8)
BF16_U = 2.0**-8  # unit roundoff of bf16 (8 significant bits)
CASES = {"ps": ("ps", "adamw"), "hybcomm": ("hybcomm", "adamw"), "bf16": ("allreduce:compress=bf16", "sgd_nomomentum")}


def step_loss(model: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return loss_of(model, *b)


@cache
def net_graph() -> ModelGraph:
    """The MLP captured with its ops (the builders read Linear roles from them)."""
    with torch.device("meta"):
        model = Net()
    example = (torch.empty(GLOBAL_BATCH, IN, device="meta"), torch.empty(GLOBAL_BATCH, OUT, device="meta"))
    return capture(model, example, name="net", loss_fn=step_loss)


def make_plan(strategy: str, optimizer: str) -> Plan:
    """The planner's replicated plan for 4 local ranks with ``strategy``'s SyncSpecs (as `plait plan --sync` does)."""
    graph = net_graph()
    plan = build_dp_plan(graph, local_cluster(WORLD), kind="replicate", global_batch=GLOBAL_BATCH, optimizer=optimizer)
    return apply_sync(plan, graph, strategy)


@pytest.fixture(scope="module")
def plans() -> dict[str, Plan]:
    return {case: make_plan(*spec) for case, spec in CASES.items()}


def settings(optimizer: str) -> dict[str, Any]:
    return ADAMW if optimizer == "adamw" else SGD


def train_cases(plan_jsons: dict[str, str], out: str) -> dict[str, Any]:
    """One rank: every plan in turn through the Trainer on one process group; losses and final state (rank 0)."""
    ctx = init_distributed()
    try:
        results = {}
        for case, text in plan_jsons.items():
            plan = plan_from_json(text)
            config = TrainConfig(steps=STEPS, progress=False, out_dir=str(Path(out) / case), **settings(plan.optimizer))
            result = Trainer(model_fn=Net, loss_fn=step_loss, data=batch, plan=plan, config=config, ctx=ctx).fit()
            results[case] = {"losses": list(result.losses), "state": result.final_state}
        return results
    finally:
        teardown()


@pytest.fixture(scope="module")
def runs(plans: dict[str, Plan], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """Rank 0's results of every case (one launch of 4 ranks) and the directory holding their metrics."""
    out = tmp_path_factory.mktemp("sync_trainer")
    results = run_ranks(train_cases, WORLD, {c: plan_to_json(p) for c, p in plans.items()}, str(out), timeout_s=120)
    return results[0], out


def reference(make_opt: Callable[..., torch.optim.Optimizer]) -> tuple[list[float], dict[str, torch.Tensor], list[float]]:
    """One process over the whole global batch: losses, final parameters and every step's max |gradient|."""
    torch.manual_seed(0)
    model = Net()
    opt = make_opt(model.parameters())
    losses, gmax = [], []
    for step in range(STEPS):
        opt.zero_grad()
        loss = step_loss(model, batch(step))
        loss.backward()
        gmax.append(max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None))
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, gmax


def test_plans_use_the_kinds_under_test(plans: dict[str, Plan]) -> None:
    kinds = {case: {p.name: p.sync.kind for p in plan.params} for case, plan in plans.items()}
    assert set(kinds["ps"].values()) == {"ps"}
    assert kinds["hybcomm"] == {"fc1.weight": "sfb", "fc1.bias": "sfb", "fc2.weight": "sfb", "fc2.bias": "sfb",
                                "fc3.weight": "ps", "fc3.bias": "ps"}
    assert {p.sync.compress for p in plans["bf16"].params} == {"bf16"}


def test_plain_all_reduce_and_fsdp_keep_their_paths(plans: dict[str, Plan]) -> None:
    graph, cluster = net_graph(), local_cluster(WORLD)
    plain = build_dp_plan(graph, cluster, kind="replicate", global_batch=GLOBAL_BATCH)
    assert not uses_runtime_sync(plain) and not uses_runtime_sync(apply_sync(plain, graph, "allreduce"))  # WFBP
    assert not uses_runtime_sync(build_dp_plan(graph, cluster, kind="fsdp", global_batch=GLOBAL_BATCH))  # FSDP2
    assert all(uses_runtime_sync(plan) for plan in plans.values())  # compressed too: never silently uncompressed


@pytest.mark.parametrize("case", ["ps", "hybcomm"])
def test_synchronous_kinds_match_one_process(case: str, runs: tuple[dict[str, Any], Path]) -> None:
    got = runs[0][case]
    ref_losses, ref_state, _ = reference(lambda ps: torch.optim.AdamW(ps, **ADAMW))
    assert got["losses"] == pytest.approx(ref_losses, rel=RTOL)
    assert set(got["state"]) == set(ref_state)
    for name, value in ref_state.items():
        torch.testing.assert_close(got["state"][name], value, rtol=0, atol=PARAM_ATOL)


def test_bf16_all_reduce_is_within_its_rounding_bound(runs: tuple[dict[str, Any], Path]) -> None:
    got = runs[0]["bf16"]
    _, ref_state, gmax = reference(lambda ps: torch.optim.SGD(ps, **SGD))
    bound = 2 * SGD["lr"] * sum(WORLD * BF16_U * g for g in gmax)
    worst = max((got["state"][n] - v).abs().max().item() for n, v in ref_state.items())
    assert worst <= bound, (worst, bound)


def test_metrics_record_each_steps_bytes(runs: tuple[dict[str, Any], Path]) -> None:
    out = runs[1]
    numel = sum(p.numel() for p in Net().parameters())  # 1864; every bucket divides by 4: the ring's chunks are equal
    bf16 = read_metrics(out / "bf16" / METRICS_FILE)
    assert [m.step for m in bf16] == list(range(1, STEPS + 1))
    ring = 2 * (WORLD - 1) * numel * 2 // WORLD  # 2(n-1)/n x bytes, 2 bytes a number: 5592
    for m in bf16:
        assert m.sync_bytes is not None
        assert m.sync_bytes["sync.sent_bytes"] == m.sync_bytes["sync.recv_bytes"] == ring
        assert m.sync_bytes["sync.allreduce-bf16.sent_bytes"] == ring
    sfb_layers = [(32, IN), (32, 32)]  # fc1, fc2 (M x N): each worker sends K(M+N) floats to P1 - 1 peers
    sfb = sum(K * (WORLD - 1) * (m + n) * 4 for m, n in sfb_layers)
    for m in read_metrics(out / "hybcomm" / METRICS_FILE):
        assert m.sync_bytes is not None
        assert m.sync_bytes["sync.sfb.sent_bytes"] == m.sync_bytes["sync.sfb.recv_bytes"] == sfb
        assert m.sync_bytes["sync.ps-s0.sent_bytes"] > 0


# ---- refusals, before any communication ---------------------------------------------------------------------------


def _trainer(plan: Plan, **config: Any) -> Trainer:
    return Trainer(model_fn=Net, loss_fn=step_loss, data=batch, plan=plan, config=TrainConfig(steps=1, **config))


def test_parameter_server_plans_refuse_checkpoints_and_adaptive(plans: dict[str, Plan], tmp_path: Path) -> None:
    with pytest.raises(PlaitError, match="parameter 'fc1.weight' is updated by a parameter server.*checkpoint"):
        _trainer(plans["ps"], checkpoint_every=1, out_dir=str(tmp_path))
    with pytest.raises(PlaitError, match="parameter 'fc1.weight' is updated by a parameter server"):
        _trainer(plans["ps"], resume=True, out_dir=str(tmp_path))
    with pytest.raises(PlaitError, match="adaptive training is not supported yet with parameter 'fc1.weight'.*'sfb'"):
        _trainer(plans["hybcomm"], adaptive=True)
    _trainer(plans["bf16"], checkpoint_every=1, out_dir=str(tmp_path))  # no server: checkpoints allowed


def test_a_sync_plan_that_does_not_fit_the_model_fails_before_communication(plans: dict[str, Plan]) -> None:
    plan = plans["hybcomm"]
    ps_spec = plans["ps"].params[0].sync
    bad = replace(plan, params=tuple(replace(p, sync=ps_spec) if p.name == "fc1.weight" else p for p in plan.params))
    ctx = DistContext(rank=0, world_size=WORLD, local_rank=0, local_world_size=WORLD, device=torch.device("cpu"),
                      backend="gloo")  # no process group: anything collective would fail differently
    with pytest.raises(PlanMismatchError, match="'fc1.bias'.*give 'fc1.weight' kind 'sfb' too"):
        apply_plan(Net(), bad, ctx, optimizer_fn=lambda ps: torch.optim.AdamW(ps))
    with pytest.raises(PlaitError, match="parameter 'fc3.weight' is served by a parameter server.*optimizer_fn"):
        apply_plan(Net(), plan, ctx)
