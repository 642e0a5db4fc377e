"""Adam-preconditioned norms (``AdamPreconditioner``): with w = 1 / (sqrt(v_hat) + eps), the probe weighs elements by
sqrt(w) ("metric") or w ("pollux") where the gradients live."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from plait.adaptive import AdamPreconditioner, GradNormProbe
from plait.errors import PlaitError
from plait.runtime import TrainConfig
from plait.runtime.batch_adapt import check_adapt_config, preconditioner_for


@pytest.mark.parametrize("form", ["metric", "pollux"])
def test_weights_follow_adam_second_moments_in_the_flat_buffer(form: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    params = list(model.parameters())
    flat = torch.zeros(sum(p.numel() for p in params))  # one bucket, as WFBP lays it out
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-6)
    pre = AdamPreconditioner(form=form, refresh_every=2)  # type: ignore[arg-type]
    probe = GradNormProbe()
    probe.preconditioner = pre
    unweighted = torch.randn(5)
    for step in range(3):
        flat.copy_(torch.randn(flat.numel()))
        probe.add_local([flat])
        probe.add_synced([flat])
        local, synced = probe.shares().tolist()
        if step == 0:  # no weights before the optimizer's first step: the plain norm
            assert local == synced == pytest.approx(float(flat.double().square().sum()), rel=1e-6)
        else:
            expected = torch.cat([(1.0 / ((opt.state[p]["exp_avg_sq"] / (1 - 0.99 ** float(opt.state[p]["step"])))
                                          .sqrt() + 1e-6)).flatten() for p in params])
            expected = expected.sqrt() if form == "metric" else expected
            if step == 2:  # refreshed after steps 1 and 2 only: the weights are those of step 2
                torch.testing.assert_close(pre.apply(flat), flat * expected)
            weighted = float((flat.double() * expected.double()).square().sum()) if step == 2 else local
            assert local == synced == pytest.approx(weighted, rel=1e-5)
        opt.step()
        pre.after_step(opt, step + 1)
    assert pre.apply(unweighted) is unweighted  # a tensor whose storage it does not know


def test_an_unknown_form_is_a_clear_error() -> None:
    with pytest.raises(PlaitError, match="gns_precondition_form is 'newton'; use one of metric, pollux"):
        check_adapt_config(TrainConfig(steps=1, adaptive=True, gns_preconditioned=True, gns_precondition_form="newton"))
    with pytest.raises(ValueError, match="not one of metric, pollux"):
        AdamPreconditioner(form="newton")  # type: ignore[arg-type]


def test_auto_weighs_by_adam_only_where_it_can_and_true_says_why_not() -> None:
    params = [nn.Parameter(torch.zeros(3))]
    sgd, adamw = torch.optim.SGD(params, lr=0.1), torch.optim.AdamW(params)
    not_replicated = object()  # an applied plan other than replicated data parallelism (FSDP2, a pipeline)
    assert preconditioner_for(not_replicated, adamw, False) is None
    assert preconditioner_for(not_replicated, sgd, "auto") is None
    assert preconditioner_for(not_replicated, adamw, "auto") is None
    with pytest.raises(PlaitError, match="the optimizer is SGD; train with Adam or AdamW"):
        preconditioner_for(not_replicated, sgd, True)
    with pytest.raises(PlaitError, match="supported on replicated data-parallel plans"):
        preconditioner_for(not_replicated, adamw, True)
    with pytest.raises(PlaitError, match="gns_preconditioned is 'yes'; use True, False or 'auto'"):
        check_adapt_config(TrainConfig(steps=1, adaptive=True, gns_preconditioned="yes"))  # type: ignore[arg-type]
    check_adapt_config(TrainConfig(steps=1))  # the default ("auto") needs no adaptive training
