"""WFBP buckets: gradients are views of the flat buffers, averaged right even when grads were set to None
or a parameter went unused, and plans that do not fit the model or the job are refused clearly."""

from __future__ import annotations

import pytest
import torch
from runkit import zoo_plan
from torch import nn

from plait.errors import PlaitError
from plait.plan import PARTIAL
from plait.runtime import DistContext, PlanMismatchError, check_plan, init_distributed, run_ranks, teardown
from plait.runtime.wfbp import WaitFreeReplicate, _build_buckets


class TwoHeads(nn.Module):
    """A body, a head that is used and a head that is not (its gradient must still be synchronised)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 5)
        self.used = nn.Linear(5, 3)
        self.unused = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(torch.tanh(self.body(x)))


BUCKETS = [["used.bias", "used.weight", "unused.bias"], ["unused.weight", "body.bias"], ["body.weight"]]


def rank_batch(rank: int) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(rank))


def views_rank() -> dict[str, object]:
    """Two steps (the second after zero_grad(set_to_none=True)) against the gradient of the mean loss."""
    ctx = init_distributed()
    torch.manual_seed(ctx.rank)  # different on purpose: the broadcast from rank 0 must fix it
    model = TwoHeads()
    sync = WaitFreeReplicate(model, BUCKETS)
    torch.manual_seed(0)
    reference = TwoHeads()
    out: dict[str, object] = {}
    for step in range(2):
        if step == 1:
            model.zero_grad(set_to_none=True)  # the next backward must re-attach the bucket views
        else:
            sync.zero_grad()
        model(rank_batch(ctx.rank)).square().mean().backward()
        reference.zero_grad()
        torch.stack([reference(rank_batch(r)).square().mean() for r in range(ctx.world_size)]).mean().backward()
        for name, p in model.named_parameters():
            ref = reference.get_parameter(name).grad
            out[f"{step}:{name}"] = (p.grad - (torch.zeros_like(p) if ref is None else ref)).abs().max().item()
    out["views"] = all(
        b.buffer.data_ptr() <= p.grad.data_ptr() < b.buffer.data_ptr() + b.buffer.numel() * 4 for b in sync.buckets for p in b.params
    )
    out["unused_grad"] = model.unused.weight.grad.abs().max().item()
    teardown()
    return out


def test_gradients_are_bucket_views_and_averaged() -> None:
    for out in run_ranks(views_rank, 3):
        assert out["views"]
        assert out["unused_grad"] == 0.0
        diffs = {k: v for k, v in out.items() if ":" in k}
        assert len(diffs) == 12
        assert max(diffs.values()) < 1e-6, diffs


def test_buckets_must_cover_each_parameter_once() -> None:
    model = TwoHeads()
    with pytest.raises(PlaitError, match="does not have"):
        _build_buckets(model, [*BUCKETS, ["head.weight"]])
    with pytest.raises(PlaitError, match="buckets 0 and 2"):
        _build_buckets(model, [BUCKETS[0], BUCKETS[1], ["body.weight", "used.bias"]])
    with pytest.raises(PlaitError, match="leave out 1 parameters .body.weight."):
        _build_buckets(model, BUCKETS[:2])
    with pytest.raises(PlaitError, match="bucket 1 of the plan is empty"):
        _build_buckets(model, [BUCKETS[0], [], *BUCKETS[1:]])
    assert [len(b.params) for b in _build_buckets(model, BUCKETS)] == [3, 2, 1]


def _ctx(world: int) -> DistContext:
    return DistContext(rank=0, world_size=world, local_rank=0, local_world_size=world, device=torch.device("cpu"), backend="gloo")


def test_plan_must_fit_the_job() -> None:
    plan = zoo_plan("mlp-tiny", "replicate", world=2, global_batch=8)
    check_plan(plan, _ctx(2))
    with pytest.raises(PlanMismatchError, match="has 2 ranks but the job has 3; launch with --nproc 2"):
        check_plan(plan, _ctx(3))
    from dataclasses import replace

    bad_batch = replace(plan, batch=replace(plan.batch, global_size=10))
    with pytest.raises(PlanMismatchError, match="batch global 10"):
        check_plan(bad_batch, _ctx(2))
    bad_axes = replace(plan, batch=replace(plan.batch, placements=()))
    with pytest.raises(PlanMismatchError, match="0 placements for a 1-axis mesh"):
        check_plan(bad_axes, _ctx(2))
    partial = replace(plan, params=(replace(plan.params[0], placements=(PARTIAL,)), *plan.params[1:]))
    with pytest.raises(PlanMismatchError, match="needs one Shard or Replicate placement per mesh axis"):
        check_plan(partial, _ctx(2))
    with pytest.raises(PlanMismatchError, match="optimizer 'lion' is not one the runtime builds"):
        check_plan(replace(plan, optimizer="lion"), _ctx(2))


def wrong_model_rank(kind: str) -> str:
    """Apply a plan made for mlp-tiny to a different model; the error message."""
    from plait.runtime import apply_plan

    ctx = init_distributed()
    try:
        apply_plan(nn.Sequential(nn.Linear(3, 3)), zoo_plan("mlp-tiny", kind, world=1, global_batch=2), ctx)
    except PlaitError as exc:
        return str(exc)
    finally:
        teardown()
    return "no error"


@pytest.mark.parametrize("kind", ["replicate", "fsdp"])
def test_plan_for_another_model_is_refused(kind: str) -> None:
    (text,) = run_ranks(wrong_model_rank, 1, kind)
    assert "the model has parameters the plan does not place (0.bias, 0.weight)" in text and "re-run `plait plan`" in text


def narrow_reduce_rank() -> dict[str, object]:
    """Gradients all-reduced in bf16: the buckets cross the wire at half the bytes, and stay fp32 views."""
    from plait.runtime.collectives import CollectiveCounter

    ctx = init_distributed()
    torch.manual_seed(0)
    model = TwoHeads()
    sync = WaitFreeReplicate(model, BUCKETS, reduce_dtype=torch.bfloat16)
    reference = TwoHeads()
    reference.load_state_dict(model.state_dict())
    with CollectiveCounter() as counter:
        model(rank_batch(ctx.rank)).square().mean().backward()
    torch.stack([reference(rank_batch(r)).square().mean() for r in range(ctx.world_size)]).mean().backward()
    gap = max(float((p.grad - reference.get_parameter(n).grad).abs().max() / reference.get_parameter(n).grad.abs().max().clamp_min(1e-6))
              for n, p in model.named_parameters() if n != "unused.weight" and n != "unused.bias")
    out = {"bytes": [e.bytes for e in counter.events], "gap": gap, "dtypes": {str(p.grad.dtype) for p in model.parameters()},
           "numels": [b.buffer.numel() for b in sync.buckets]}
    teardown()
    return out


def test_gradients_can_be_reduced_in_bf16() -> None:
    (out, _) = run_ranks(narrow_reduce_rank, 2)
    assert out["bytes"] == [2 * n for n in out["numels"]]  # bf16 on the wire
    assert out["dtypes"] == {"torch.float32"}
    assert 0 < out["gap"] < 1e-2  # bf16 rounding of the sum (relative to each gradient's largest element)
