"""Adaptive batch in the Trainer (issue 10, deliverable 4): the goodput choice applied without a restart.

The throughput model is pinned in these tests (a fixed prior that measurements cannot move: a large per-step
overhead, so goodput grows with the batch while the noise scale is positive), so the choice does not depend on
the machine's load: the batch grows to ``max_batch_size`` at the first decision that has two noise-scale estimates.

* On 2 ranks the batch changes, every rank applies the same batch, and training matches a one-process loop that
  takes the same batches from the same sample stream with the same learning-rate factors.
* Off (``adapt_batch_every=0``) installs nothing, and an adapter that never changes the batch trains bit-identically
  to off.
* A resumed run continues with the adapted batch and ends where an uninterrupted run ends.
* Bad configurations fail with a clear ``PlaitError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from runkit import zoo_plan

from plait.adaptive import ThroughputModel, scaled_lr
from plait.adaptive.throughput import PerfParams, Prior
from plait.data.samples import SampleStream, TensorSamples
from plait.errors import PlaitError
from plait.models import zoo_model
from plait.plan import Plan
from plait.runtime import TrainConfig, Trainer, init_distributed, run_ranks, teardown
from plait.runtime import batch_adapt as batch_adapt_mod
from plait.runtime.optim import build_optimizer

NAME = "mlp-tiny"  # 16 -> 32 x 3 -> 8
NUM_SAMPLES = 512
OPT: dict[str, Any] = {"lr": 1e-2, "eps": 1e-6, "progress": False, "log_every": 1000}
# decisions every 2 steps on the statistics of every step before (by default they reach the ranks 4 steps at a time)
ADAPT: dict[str, Any] = {"adaptive": True, "adapt_batch_every": 2, "max_batch_size": 64, "lr_scaling": "adamscale",
                         "gns_reduce_every": 1}


def _stream(seed: int = 3) -> SampleStream:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(NUM_SAMPLES, 16, generator=g)
    w = torch.randn(16, 8, generator=g)
    y = x @ w + 3.0 + 0.5 * torch.randn(NUM_SAMPLES, 8, generator=g)  # learnable (far from the start), with noise
    return SampleStream(TensorSamples(x, y), seed=seed)


def _pin_model() -> None:
    """Every rank's adapter gets a throughput model fixed at a large per-step overhead (no measurement moves it)."""
    params = PerfParams(alpha_c=1.0, beta_c=1e-4, alpha_n=1e-3, beta_n=1e-4, alpha_r=1e-3, beta_r=1e-4, gamma=1.0)
    prior = Prior(*(torch.ones(1).double().numpy() for _ in range(5)), params=params)  # type: ignore[arg-type]

    def build(plan: Plan, micro_sizes: list[int]) -> tuple[ThroughputModel, str]:
        model = ThroughputModel(prior, prior_strength=1e12)
        model.refit = lambda: params  # type: ignore[method-assign]
        return model, "pinned for the test"

    batch_adapt_mod.build_throughput_model = build  # type: ignore[assignment]


def _rank_fit(plan: Plan, configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run one Trainer per config on this rank (one after the other); what each did."""
    _pin_model()
    zm = zoo_model(NAME)
    ctx = init_distributed()
    out = []
    try:
        for config in configs:
            trainer = Trainer(model_fn=zm.build, loss_fn=zm.loss, data=_stream(), plan=plan, ctx=ctx,
                              config=TrainConfig(**{**OPT, **config}))
            result = trainer.fit()
            adapter = trainer.adapter
            out.append({"losses": list(result.losses), "final": result.final_state,
                        "batches": [s.batch_size for s in result.adaptive],
                        "factors": [s.lr_factor for s in result.adaptive],
                        "spec": None if adapter is None else (adapter.spec.global_size, adapter.spec.micro_size,
                                                              adapter.spec.num_micro),
                        "applied_batch": getattr(trainer.applied, "global_batch", None) or trainer.applied.batch.global_size,  # type: ignore[union-attr]
                        "decisions": [] if adapter is None else [d.describe() for d in adapter.decisions],
                        "has_adapter": adapter is not None})
    finally:
        teardown()
    return out


def _reference(batches: list[int], factors: list[float]) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process: the whole model, the same batches of the same stream, the same learning-rate factors."""
    zm = zoo_model(NAME)
    torch.manual_seed(0)
    model = zm.build()
    opt = build_optimizer("adamw", list(model.parameters()), lr=OPT["lr"], betas=(0.9, 0.999), eps=OPT["eps"],
                          weight_decay=0.01, momentum=0.9)
    stream = _stream()
    losses = []
    for size, factor in zip(batches, factors, strict=True):
        opt.zero_grad(set_to_none=True)
        loss = zm.loss(model, stream.next_batch(size))
        loss.backward()
        with scaled_lr(opt, factor):
            opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_adaptive_batch_changes_agrees_on_ranks_and_matches_one_process() -> None:
    plan = zoo_plan(NAME, "replicate", world=2, global_batch=16)
    runs = run_ranks(_rank_fit, 2, plan, [{"steps": 8, **ADAPT}], timeout_s=240)
    r0, r1 = runs[0][0], runs[1][0]
    # the statistics lag a step, so the first decision (after step 2) has one estimate: too few; the second changes
    assert r0["batches"] == [16] * 4 + [64] * 4, r0["decisions"]
    assert r0["spec"] == r1["spec"] == (64, 32, 1) and r0["applied_batch"] == r1["applied_batch"] == 64
    assert r0["batches"] == r1["batches"] and r0["factors"] == r1["factors"]
    assert r0["decisions"][0].startswith("batch: 16 -> 64 (local 32 x 1 accum), predicted goodput +")
    assert all(f > 1.0 for f in r0["factors"][4:])  # adamscale: sqrt(gain) > 1 on the larger batch
    losses, final = _reference(r0["batches"], r0["factors"])
    assert r0["losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    for name, value in final.items():
        torch.testing.assert_close(r0["final"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_off_installs_nothing_and_a_never_changing_adapter_trains_identically() -> None:
    plan = zoo_plan(NAME, "replicate", world=2, global_batch=16)
    base = {"steps": 5, "adaptive": True}
    off, still = run_ranks(_rank_fit, 2, plan, [base, {**base, **ADAPT, "adapt_threshold": 1e9}], timeout_s=240)[0]
    assert not off["has_adapter"] and still["has_adapter"] and still["decisions"] == []
    assert off["batches"] == still["batches"] == [16] * 5
    assert off["losses"] == still["losses"]
    for name, value in off["final"].items():
        assert torch.equal(value, still["final"][name]), name


def test_resume_restores_the_adapted_batch(tmp_path: Path) -> None:
    plan = zoo_plan(NAME, "fsdp", world=2, global_batch=16)
    out = str(tmp_path / "run")
    full, first, resumed = run_ranks(_rank_fit, 2, plan, [
        {"steps": 8, **ADAPT},
        {"steps": 5, "checkpoint_every": 4, "out_dir": out, **ADAPT},
        {"steps": 8, "resume": True, "out_dir": out, **ADAPT},
    ], timeout_s=240)[0]
    assert full["batches"] == [16] * 4 + [64] * 4
    assert resumed["batches"] == [64] * 4 and resumed["spec"] == full["spec"] == (64, 32, 1)
    assert resumed["losses"] == pytest.approx(full["losses"][4:], rel=1e-6)
    for name, value in full["final"].items():
        torch.testing.assert_close(resumed["final"][name], value, rtol=1e-6, atol=1e-7, msg=name)


def _one_rank(plan: Plan, config: dict[str, Any]) -> str:
    zm = zoo_model(NAME)
    ctx = init_distributed()
    try:
        Trainer(model_fn=zm.build, loss_fn=zm.loss, data=_stream(), plan=plan, ctx=ctx,
                config=TrainConfig(**{**OPT, **config})).fit()
    except PlaitError as e:
        return str(e)
    finally:
        teardown()
    return ""


def test_bad_configurations_are_clear_errors() -> None:
    with pytest.raises(PlaitError, match="needs adaptive=True"):
        TrainConfig(steps=1, adapt_batch_every=2)
    with pytest.raises(PlaitError, match="adapt_batch_every is -1"):
        TrainConfig(steps=1, adapt_batch_every=-1)
    with pytest.raises(PlaitError, match="max_local_batch"):
        TrainConfig(steps=1, adaptive=True, adapt_batch_every=2, min_local_batch=8, max_local_batch=4)
    with pytest.raises(PlaitError, match="max_accumulation"):
        TrainConfig(steps=1, adaptive=True, adapt_batch_every=2, max_accumulation=0)
    zm = zoo_model(NAME)
    plan = zoo_plan(NAME, "replicate", world=2, global_batch=16)
    with pytest.raises(PlaitError, match="SampleStream"):
        Trainer(model_fn=zm.build, loss_fn=zm.loss, data=lambda step: zm.make_batch(16), plan=plan,
                config=TrainConfig(steps=1, **ADAPT))
    one = zoo_plan(NAME, "replicate", world=1, global_batch=16)
    msg = run_ranks(_one_rank, 1, one, {"steps": 2, **ADAPT}, timeout_s=120)[0]
    assert "max_accumulation >= 2" in msg


def test_one_replica_adapts_with_accumulation_and_matches_one_process() -> None:
    plan = zoo_plan(NAME, "replicate", world=1, global_batch=16, micro_batch=8, num_micro=2)
    run = run_ranks(_rank_fit, 1, plan, [{"steps": 6, **ADAPT, "max_accumulation": 4}], timeout_s=120)[0][0]
    # one replica measures its noise across micro-batches, so it keeps accumulating (s >= 1) above the initial batch
    assert run["batches"] == [16] * 4 + [64] * 2 and run["spec"] == (64, 32, 2), run["decisions"]
    losses, final = _reference(run["batches"], run["factors"])
    assert run["losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    for name, value in final.items():
        torch.testing.assert_close(run["final"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_resume_on_another_number_of_ranks_splits_the_adapted_batch_anew(tmp_path: Path) -> None:
    out = str(tmp_path / "run")
    run_ranks(_rank_fit, 2, zoo_plan(NAME, "replicate", world=2, global_batch=16),
              [{"steps": 5, "checkpoint_every": 4, "out_dir": out, **ADAPT}], timeout_s=240)
    # an elastic resize 2 -> 4 ranks: the adapted batch of 64 is kept, as 4 replicas x 16
    resumed = run_ranks(_rank_fit, 4, zoo_plan(NAME, "replicate", world=4, global_batch=16),
                        [{"steps": 6, "resume": True, "out_dir": out, **ADAPT}], timeout_s=240)[0][0]
    assert resumed["batches"] == [64, 64] and resumed["spec"] == (64, 16, 1)


def _pipeline_plan(world: int, schedule: str = "1f1b") -> Plan:
    """mlp-tiny as 2 stages (1F1B, 2 micro-batches) on ``world`` ranks (2 x ``world // 2`` replicas)."""
    from plait.cluster import local_cluster
    from plait.cost import CostModel
    from plait.graph import capture
    from plait.planners.pipeline import PipelineOptions, plan_pipeline
    from plait.planners.pipeline_plan import build_pipeline_plan

    zm = zoo_model(NAME)
    with torch.device("meta"):
        model = zm.build()
    graph = capture(model, zm.make_batch(8, device="meta"), name=NAME, loss_fn=zm.loss, with_ops=False)
    cluster = local_cluster(world)
    cost = CostModel(cluster)
    options = PipelineOptions(same_size=True, min_stages=2, micro_batches=(2,), tp_sizes=(1,))
    choice = plan_pipeline(graph, cluster, global_batch=16, cost=cost, options=options)
    return build_pipeline_plan(graph, cluster, choice, global_batch=16, cost=cost, schedule=schedule)


@pytest.mark.parametrize(("world", "schedule"), [(2, "1f1b"), (2, "zero-bubble"), (4, "gpipe")])
def test_a_pipeline_changes_its_micro_batch_size_and_matches_one_process(world: int, schedule: str) -> None:
    run = run_ranks(_rank_fit, world, _pipeline_plan(world, schedule), [{"steps": 6, **ADAPT}], timeout_s=240)[0][0]
    micro = 64 // (world // 2) // 2  # the 2 micro-batches per replica are kept; each grows
    assert run["batches"] == [16] * 4 + [64] * 2 and run["spec"] == (64, micro, 2), run["decisions"]
    losses, final = _reference(run["batches"], run["factors"])
    assert run["losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    for name, value in final.items():
        torch.testing.assert_close(run["final"][name], value, rtol=1e-4, atol=1e-5, msg=name)
