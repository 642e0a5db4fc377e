"""Compressed all-reduce on 4 gloo ranks: a small, bounded error against one process, and fewer bytes.

Plain SGD (lr 0.1, 5 steps) on the tiny MLP, so the error bound is explicit: the parameters after T steps
differ from the reference by lr * sum_t |g~_t - g_t| plus the second-order drift of gradients taken at slightly
different parameters.

- fp16 / bf16: each averaged gradient element is rounded once when cast and at most n - 1 times while the ring
  sums it, so |g~ - g| <= n * u * max|g| (u = 2^-11 for fp16, 2^-8 for bf16). The test allows twice
  lr * sum_t n * u * max|g_t| for the drift. Bytes: half of the fp32 ring, 2(n-1)/n * 2 bytes per number.
- PowerSGD rank r with error feedback: a step's error is large, but error feedback makes the applied gradients
  sum to the true ones minus the mean residual, so theta_T - theta_ref = lr * mean_k(e_k) + drift; the test bounds
  the drift. At r = min(M, N) the approximation is exact; a matrix whose factors are not smaller than itself,
  r(M + N) >= MN, travels uncompressed. Bytes: the ring carries r(M + N) numbers per matrix (P and Q, two
  all-reduces) and the biases uncompressed.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_sync_kit import WORLD, batch, build_net, loss_of, param_shapes, reference, run_scenarios, specs_all

from plait.runtime import run_ranks
from plait.runtime.sync import AllReduceSync, ModelSync, PowerSGD

STEPS = 5
LR = 0.1
F32 = 4
UNIT_ROUNDOFF = {"fp16": 2.0**-11, "bf16": 2.0**-8}
DRIFT_ATOL = 2e-3  # PowerSGD: |theta - theta_ref - lr * mean residual| (measured: 4.5e-4 at r = 1, 2.6e-4 at r = 2)
LOSS_RTOL_POWERSGD = 0.05  # measured: 2.2e-2 at r = 1, 1.3e-2 at r = 2
EXACT_ATOL = 1e-6  # PowerSGD's uncompressed fallback (measured: 3e-8)

SCENARIOS = {
    "fp16": specs_all("allreduce", compress="fp16"),
    "bf16": specs_all("allreduce", compress="bf16"),
    "powersgd-r1": specs_all("allreduce", compress="powersgd"),
    "powersgd-r2": specs_all("allreduce", compress="powersgd", compress_rank=2),
    "powersgd-full": specs_all("allreduce", compress="powersgd", compress_rank=32),  # factors no smaller: plain
}


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR)


def residuals(sync: ModelSync) -> dict[str, Any]:
    """PowerSGD's error-feedback memory on this rank, per parameter."""
    out: dict[str, torch.Tensor] = {}
    for s in sync.synchronizers:
        if isinstance(s, AllReduceSync) and s.powersgd is not None:
            out.update({n: r.clone() for n, r in s.powersgd.residuals.items()})
    return {"residuals": out}


@pytest.fixture(scope="module")
def runs() -> list[dict[str, Any]]:
    return run_ranks(run_scenarios, WORLD, SCENARIOS, STEPS, sgd, residuals, timeout_s=120)


@pytest.fixture(scope="module")
def ref() -> tuple[list[float], dict[str, torch.Tensor]]:
    return reference(STEPS, sgd)


def max_grads() -> list[float]:
    """The reference's largest gradient element per step."""
    model = build_net()
    opt = sgd(model.parameters())
    out = []
    for step in range(STEPS):
        opt.zero_grad()
        loss_of(model, *batch(step)).backward()
        out.append(max(p.grad.abs().max().item() for p in model.parameters()))
        opt.step()
    return out


def numel(name: str) -> int:
    return int(torch.Size(param_shapes()[name]).numel())


def ring(numbers: int, width: int) -> int:
    """Bytes a rank sends in a ring all-reduce of ``numbers`` elements of ``width`` bytes (n divides numbers)."""
    assert numbers % WORLD == 0
    return 2 * (WORLD - 1) * numbers * width // WORLD


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_cast_compression_error_is_bounded(dtype: str, runs: list[dict[str, Any]], ref: tuple[list[float], dict[str, torch.Tensor]]) -> None:
    bound = 2 * LR * sum(WORLD * UNIT_ROUNDOFF[dtype] * g for g in max_grads())
    _, ref_state = ref
    for result in runs:
        worst = max((result[dtype]["state"][n] - ref_state[n]).abs().max().item() for n in ref_state)
        assert worst <= bound, f"{dtype}: parameters {worst:.2e} from the reference, bound {bound:.2e}"
    numbers = sum(numel(n) for n in param_shapes())
    for result in runs:
        for counts in result[dtype]["bytes"]:
            assert counts["sync.sent_bytes"] == counts["sync.recv_bytes"] == ring(numbers, 2)  # half of fp32's


@pytest.mark.parametrize(("scenario", "rank"), [("powersgd-r1", 1), ("powersgd-r2", 2)])
def test_powersgd_error_is_the_residual(scenario: str, rank: int, runs: list[dict[str, Any]],
                                        ref: tuple[list[float], dict[str, torch.Tensor]]) -> None:
    ref_losses, ref_state = ref
    for result in runs:
        got = result[scenario]
        assert set(got["residuals"]) == {n for n in param_shapes() if n.endswith("weight")}
        for name in ref_state:
            theta, want = got["state"][name], ref_state[name]
            if name in got["residuals"]:  # matrices: the difference is lr x the mean residual, up to drift
                mean = sum(r[scenario]["residuals"][name] for r in runs) / WORLD
                assert (theta - want - LR * mean.view_as(want)).abs().max().item() <= DRIFT_ATOL
                assert (theta - want).abs().max().item() > DRIFT_ATOL  # the compression is real
            else:  # vectors travel uncompressed: only the drift
                assert (theta - want).abs().max().item() <= DRIFT_ATOL
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref_losses), rtol=LOSS_RTOL_POWERSGD, atol=0)
    mats = [param_shapes()[n] for n in param_shapes() if n.endswith("weight")]
    p_numbers, q_numbers = sum(rank * m for m, _ in mats), sum(rank * n for _, n in mats)
    biases = sum(numel(n) for n in param_shapes() if n.endswith("bias"))
    want = ring(p_numbers, F32) + ring(q_numbers, F32) + ring(biases, F32)
    assert want < ring(sum(numel(n) for n in param_shapes()), F32)
    for result in runs:
        assert all(c["sync.sent_bytes"] == c["sync.recv_bytes"] == want for c in result[scenario]["bytes"])


def test_powersgd_falls_back_where_factors_are_not_smaller(runs: list[dict[str, Any]],
                                                           ref: tuple[list[float], dict[str, torch.Tensor]]) -> None:
    # at r = 32 every matrix has r(n + m) >= n·m, so everything travels uncompressed: exact, the fp32 ring's bytes
    _, ref_state = ref
    for result in runs:
        assert result["powersgd-full"]["residuals"] == {}
        for name, value in result["powersgd-full"]["state"].items():
            torch.testing.assert_close(value, ref_state[name], rtol=0, atol=EXACT_ATOL)
        numbers = sum(numel(n) for n in param_shapes())
        assert all(c["sync.sent_bytes"] == ring(numbers, F32) for c in result["powersgd-full"]["bytes"])


def test_powersgd_at_full_rank_is_exact_on_one_rank() -> None:
    g = torch.randn(12, 7, generator=torch.Generator().manual_seed(1))
    (approx,) = PowerSGD(7).average([("w", g)], lambda flat: None, 1)
    torch.testing.assert_close(approx, g, rtol=0, atol=1e-5)


def test_error_feedback_telescopes_on_one_rank() -> None:
    # sum_t approx_t + e_T == sum_t g_t exactly when nothing is reduced (one worker)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(12, 7, generator=gen) for _ in range(6)]
    psgd = PowerSGD(1, error_feedback=True)
    applied = torch.zeros(12, 7)
    for g in grads:
        (approx,) = psgd.average([("w", g)], lambda flat: None, 1)
        applied += approx
        assert (approx - g).abs().max() > 1e-2  # rank 1 of a random 12 x 7 matrix is far from it
    torch.testing.assert_close(applied + psgd.residuals["w"], sum(grads), rtol=0, atol=1e-5)
