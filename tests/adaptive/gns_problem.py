"""Linear regression with fixed known features and Gaussian label noise: the exact gradient statistics.

Samples are rows of a fixed feature matrix ``X`` (drawn uniformly, with replacement) with labels
``y = x . w_star + eps``, ``eps ~ N(0, sigma^2)``. The loss of a batch is ``0.5 * mean((x . w - y)^2)``,
so one sample's gradient at ``w = w_star + delta`` is ``g = x (x . delta - eps)``. Over the sampling,

    G         = mean_j x_j r_j,                       r_j = x_j . delta
    E|g|^2    = mean_j |x_j|^2 (r_j^2 + sigma^2)
    tr(Sigma) = E|g|^2 - |G|^2

exactly (finite averages over the fixed rows). The last feature is a constant 1: the bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plait.adaptive import GradStats

DIM = 129  # features, the last one the constant 1 (bias)
ROWS = 512
SIGMA = 2.0  # label noise
OFFSET = 0.4  # |delta| per coordinate: how far w is from the optimum


@dataclass(frozen=True)
class LinearProblem:
    """The fixed rows, the optimum and the point where the gradient statistics are measured."""

    features: torch.Tensor  # (ROWS, DIM) float64
    w_star: torch.Tensor  # (DIM,)
    w: torch.Tensor  # (DIM,): the current parameters
    sigma: float

    def truth(self) -> GradStats:
        """Exact |G|^2 and tr(Sigma) of one sample's gradient at ``w``."""
        resid = self.features @ (self.w - self.w_star)
        grad = (self.features * resid[:, None]).mean(0)
        second = ((self.features**2).sum(1) * (resid**2 + self.sigma**2)).mean()
        sqr = float(grad @ grad)
        return GradStats(sqr=sqr, trace=float(second) - sqr)

    def batch(self, gen: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` samples: rows drawn with replacement and their noisy labels."""
        rows = torch.randint(0, self.features.shape[0], (size,), generator=gen)
        x = self.features[rows]
        noise = torch.randn(size, generator=gen, dtype=torch.float64) * self.sigma
        return x, x @ self.w_star + noise


def make_problem(seed: int = 0) -> LinearProblem:
    """The test problem (the same on every rank for a seed)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, DIM, generator=gen, dtype=torch.float64)
    x[:, -1] = 1.0
    w_star = torch.randn(DIM, generator=gen, dtype=torch.float64)
    signs = torch.randint(0, 2, (DIM,), generator=gen).to(torch.float64) * 2 - 1
    return LinearProblem(features=x, w_star=w_star, w=w_star + OFFSET * signs, sigma=SIGMA)


def loss(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the batch, halved."""
    return 0.5 * ((x @ w - y) ** 2).mean()


def grad_of(problem: LinearProblem, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The batch-mean gradient at ``problem.w`` by autograd."""
    w = problem.w.clone().requires_grad_(True)
    loss(w, x, y).backward()
    assert w.grad is not None
    return w.grad
