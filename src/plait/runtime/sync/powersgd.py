"""PowerSGD (Vogels et al., NeurIPS 2019): all-reduce rank-r factors of each gradient matrix instead of the matrix.

For a local gradient G_k (n x m, a parameter reshaped to (shape[0], -1)) and its error-feedback residual e_k,
one power-iteration step with warm start does:

    M_k = G_k + e_k;  P = mean_k(M_k Q);  P <- orthonormal columns of P;  Q = mean_k(M_k^T P);  G~ = P Q^T;
    e_k <- M_k - G~   (error feedback: what the approximation missed is added to the next step's gradient)

Q starts from the same seeded normal matrix on every rank and is kept between steps (warm start). Two
all-reduces move r(n + m) numbers per matrix instead of n·m. Because the residual carries what each step
dropped, the sum of the applied gradients over steps t = 1..T equals the sum of the true averaged gradients
minus the mean residual mean_k(e_k) after step T (the identity the tests check).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import torch

Reduce = Callable[[torch.Tensor], None]  # sums a flat tensor over the group in place


class PowerSGD:
    """Rank-r compressed averaging of gradient matrices with warm start and optional error feedback."""

    def __init__(self, rank: int, *, error_feedback: bool = True, seed: int = 0) -> None:
        self.rank = rank
        self.error_feedback = error_feedback
        self.seed = seed
        self.q: dict[str, torch.Tensor] = {}  # warm-start factor per parameter (m x r)
        self.residuals: dict[str, torch.Tensor] = {}  # error-feedback memory per parameter (n x m)

    def effective_rank(self, matrix_shape: tuple[int, int]) -> int:
        """The rank used for an n x m matrix (r, capped at min(n, m))."""
        return min(self.rank, *matrix_shape)

    def worth_it(self, t: torch.Tensor) -> bool:
        """True when ``t`` (two or more dims, as an n x m matrix) is smaller as rank-r factors: r(n + m) < n·m."""
        if t.dim() < 2:
            return False
        n, m = t.shape[0], t.numel() // t.shape[0]
        return self.effective_rank((n, m)) * (n + m) < n * m

    def average(self, named: Sequence[tuple[str, torch.Tensor]], reduce: Reduce, size: int) -> list[torch.Tensor]:
        """The rank-r approximations of the group mean of each (name, local gradient matrix), in order."""
        ms = [self._with_residual(name, g) for name, g in named]
        qs = [self._warm_q(name, m) for (name, _), m in zip(named, ms, strict=True)]
        ps = _mean([m @ q for m, q in zip(ms, qs, strict=True)], reduce, size)
        ps = [torch.linalg.qr(p, mode="reduced").Q for p in ps]
        qs = _mean([m.t() @ p for m, p in zip(ms, ps, strict=True)], reduce, size)
        out = []
        for (name, _), m, p, q in zip(named, ms, ps, qs, strict=True):
            self.q[name] = q
            approx = p @ q.t()
            if self.error_feedback:
                self.residuals[name] = m - approx
            out.append(approx)
        return out

    def _with_residual(self, name: str, g: torch.Tensor) -> torch.Tensor:
        residual = self.residuals.get(name) if self.error_feedback else None
        return g + residual if residual is not None else g.clone()

    def _warm_q(self, name: str, m: torch.Tensor) -> torch.Tensor:
        q = self.q.get(name)
        if q is None:  # the same start on every rank: seeded by the seed and a stable hash of the name
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
            r = self.effective_rank((m.shape[0], m.shape[1]))
            q = torch.randn(m.shape[1], r, generator=gen).to(dtype=m.dtype, device=m.device)
        return q


def payload_numel(shapes: Sequence[tuple[int, int]], rank: int) -> int:
    """Numbers PowerSGD all-reduces for matrices of these shapes: sum of r(n + m), r capped at min(n, m)."""
    return sum(min(rank, n, m) * (n + m) for n, m in shapes)


def _mean(tensors: list[torch.Tensor], reduce: Reduce, size: int) -> list[torch.Tensor]:
    """All-reduce a list of tensors as one flat buffer and divide by the group size."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1) for t in tensors])
    reduce(flat)
    flat.div_(size)
    return split_like(flat, tensors)


def split_like(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like ``tensors``, in order (``flat`` holds them concatenated)."""
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out
