"""Adam-preconditioned norms (``AdamPreconditioner``): weights 1 / (sqrt(v_hat) + eps) where the gradients live."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from plait.adaptive import AdamPreconditioner, GradNormProbe


def test_weights_follow_adam_second_moments_in_the_flat_buffer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    params = list(model.parameters())
    flat = torch.zeros(sum(p.numel() for p in params))  # one bucket, as WFBP lays it out
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-6)
    pre = AdamPreconditioner(refresh_every=2)
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
            if step == 2:  # refreshed after steps 1 and 2 only: the weights are those of step 2
                torch.testing.assert_close(pre.apply(flat), flat * expected)
            weighted = float((flat.double() * expected.double()).square().sum()) if step == 2 else local
            assert local == synced == pytest.approx(weighted, rel=1e-5)
        opt.step()
        pre.after_step(opt)
    assert pre.apply(unweighted) is unweighted  # a tensor whose storage it does not know
