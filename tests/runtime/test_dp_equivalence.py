"""Data-parallel equivalence: plait's runtime on 2-4 gloo ranks matches one plain PyTorch process.

Each case trains a zoo model for 5 AdamW steps through the Trainer with a captured-and-planned Plan
(replicate = plait's WFBP buckets, fsdp = FSDP2, hybrid = HSDP on a 2x2 mesh), and compares with a
single-process loop over the same global batches: the gradients of the first step (which catch a wrong
averaging factor that Adam's scale invariance would hide), every step's loss, and the final parameters.
"""

from __future__ import annotations

import pytest
import torch
from runkit import zoo_plan
from torch import nn

from plait.models import zoo_model
from plait.runtime import TrainConfig, Trainer, init_distributed, run_ranks, teardown

STEPS = 5
OPT = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01}
RTOL, ATOL = 1e-5, 1e-6  # losses (measured: <= 2.1e-7 relative)
GRAD_ATOL = 1e-7  # first-step gradients (measured: <= 1.5e-8 absolute)
# Parameters after 5 steps (measured: <= 1.3e-7 for the MLP, <= 1.1e-6 for the GPT). Adam divides each
# gradient element by its running RMS, so the rounding difference of an element whose gradient is ~0
# (the attention key bias has an exact gradient of 0) becomes a parameter difference of up to
# lr * |rounding| / eps per step; eps = 1e-6 keeps that below the tolerance (with 1e-8 it reaches 6e-5).
PARAM_ATOL = 2e-6


def batches(name: str, global_batch: int):
    """The global batch of each step, the same for every rank and for the reference."""
    zm = zoo_model(name)
    return lambda step: zm.make_batch(global_batch, generator=torch.Generator().manual_seed(1000 + step))


def reference(name: str, global_batch: int) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A plain single-process loop: losses, first-step gradients and final parameters."""
    zm, data = zoo_model(name), batches(name, global_batch)
    torch.manual_seed(0)
    model = zm.build()
    opt = torch.optim.AdamW(model.parameters(), **OPT)
    losses, grads = [], {}
    for step in range(STEPS):
        opt.zero_grad()
        loss = zm.loss(model, data(step))
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
    return losses, grads, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train_rank(name: str, plan) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """One rank: the Trainer on the plan; returns losses, first-step gradients, final state, bucket launches."""
    zm = zoo_model(name)
    grads: dict[str, torch.Tensor] = {}

    def capture_grads(step: int, model: nn.Module) -> None:
        if step == 0:
            grads.update({n: _full(p.grad).detach().clone() for n, p in model.named_parameters()})

    ctx = init_distributed()
    trainer = Trainer(
        model_fn=zm.build, loss_fn=zm.loss, data=batches(name, plan.batch.global_size), plan=plan,
        config=TrainConfig(steps=STEPS, progress=False, **OPT), ctx=ctx, before_step=capture_grads,
    )
    result = trainer.fit()
    assert trainer.applied is not None
    launches = trainer.applied.replicate.num_launches if trainer.applied.replicate is not None else 0
    teardown()
    return list(result.losses), grads, result.final_state, launches


CASES = [
    # model, kind, ranks, global batch, micro batch, nodes, bucket bytes
    ("gpt-tiny", "replicate", 2, 8, 4, 1, 16384),
    ("gpt-tiny", "replicate", 4, 8, 2, 1, 16384),
    ("gpt-tiny", "fsdp", 2, 8, 4, 1, 16384),
    ("gpt-tiny", "fsdp", 4, 8, 2, 1, 16384),
    ("mlp-tiny", "replicate", 2, 16, 8, 1, 2048),
    ("mlp-tiny", "replicate", 4, 16, 4, 1, 2048),
    ("mlp-tiny", "fsdp", 2, 16, 8, 1, 2048),
    ("mlp-tiny", "fsdp", 4, 16, 4, 1, 2048),
    ("gpt-tiny", "hybrid", 4, 8, 2, 2, 16384),
    # gradient accumulation: num_micro = global / (micro x ranks) = 2
    ("mlp-tiny", "replicate", 4, 16, 2, 1, 2048),
    ("gpt-tiny", "fsdp", 2, 8, 2, 1, 16384),
    ("mlp-tiny", "hybrid", 4, 16, 2, 2, 2048),
]


@pytest.mark.parametrize(("name", "kind", "ranks", "global_batch", "micro", "nodes", "bucket"), CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}r-accum{c[3] // (c[4] * c[2])}" for c in CASES])
def test_matches_single_process(name: str, kind: str, ranks: int, global_batch: int, micro: int, nodes: int, bucket: int) -> None:
    plan = zoo_plan(name, kind, world=ranks, global_batch=global_batch, micro_batch=micro, nodes=nodes, bucket_bytes=bucket)
    assert plan.batch.num_micro == global_batch // (micro * ranks)
    ref_losses, ref_grads, ref_state = reference(name, global_batch)
    results = run_ranks(train_rank, ranks, name, plan, timeout_s=240)
    losses, grads, state, launches = results[0]
    for other in results[1:]:
        assert other[0] == losses  # every rank reports the same averaged loss
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=RTOL, atol=GRAD_ATOL, msg=f"first-step gradient of {n}")
    assert state.keys() == ref_state.keys()
    for n, t in state.items():
        torch.testing.assert_close(t, ref_state[n], rtol=RTOL, atol=PARAM_ATOL, msg=f"parameter {n} after {STEPS} steps")
    if kind == "replicate":  # one all-reduce per bucket per step, none in accumulation micro-steps
        assert launches == STEPS * len(plan.buckets)
        assert len(plan.buckets) > 1
