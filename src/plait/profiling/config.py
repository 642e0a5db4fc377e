"""What `plait profile` measures: sizes, repeats and ranks, for the quick and the full profile."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from plait.errors import PlaitError

ProfileDevice = Literal["cpu", "cuda"]
KB, MB = 1024, 1024 * 1024


class ProfilingError(PlaitError):
    """`plait profile` could not measure the machine (bad options, a rank that failed or hung)."""


@dataclass(frozen=True, kw_only=True)
class ProfileConfig:
    """Everything the ranks of one `plait profile` run need to know."""

    device: ProfileDevice
    nproc: int  # ranks per node: collectives run among node 0's; CPU compute is measured with 1..nproc of them busy
    quick: bool
    matmul_sizes: tuple[int, ...]  # square GEMM sides
    dtypes: tuple[str, ...]  # matmul dtypes ("fp32", "bf16", ...)
    concurrency: tuple[int, ...]  # numbers of ranks computing at once (CPU); (1,) on CUDA
    collective_bytes: tuple[int, ...]  # full tensor sizes of the collectives
    copy_numel: int  # elements of the copy / elementwise benchmarks
    adamw_numel: int  # elements of the AdamW benchmark's large tensor
    warmup: int
    repeats: int
    threads_per_rank: int = 1
    timeout_s: float = 900.0
    nnodes: int = 1  # nodes of nproc ranks each; >1 adds the link between node 0 and node 1 (``collective_bytes``)

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ProfilingError(f"--nproc must be at least 1, got {self.nproc}")
        if self.nnodes < 1:
            raise ProfilingError(f"--nnodes must be at least 1, got {self.nnodes}")
        if any(c < 1 or c > self.nproc for c in self.concurrency):
            raise ProfilingError(f"concurrency levels {self.concurrency} must lie in 1..nproc ({self.nproc})")

    @property
    def world_size(self) -> int:
        """Ranks on all nodes."""
        return self.nnodes * self.nproc

    @property
    def link_pairs(self) -> tuple[int, ...]:
        """Numbers of rank pairs crossing the inter-node link at once: one alone, then every rank of a node."""
        if self.nnodes < 2:
            return ()
        return (1,) if self.nproc == 1 else (1, self.nproc)

    @property
    def num_steps(self) -> int:
        """Progress steps: one per concurrency level and one per measured collective or link table entry."""
        groups = max(0, self.nproc - 1)
        per_size = 4 * groups + (1 if self.nproc >= 2 else 0)  # four collectives per group size, then p2p
        sync = groups if self.device == "cpu" else 0  # one synchronisation measurement per group size
        links = len(self.link_pairs) * len(self.collective_bytes)
        return len(self.concurrency) + per_size * len(self.collective_bytes) + sync + links


def default_config(*, device: ProfileDevice, nproc: int, quick: bool, nnodes: int = 1) -> ProfileConfig:
    """The quick (well under a minute here) or full (a few minutes) profile of ``nproc`` ranks (per node,
    on ``nnodes`` nodes)."""
    if device == "cuda":
        return ProfileConfig(
            device="cuda",
            nproc=nproc,
            nnodes=nnodes,
            quick=quick,
            matmul_sizes=(512, 1024, 2048, 4096) if quick else (256, 512, 1024, 2048, 4096, 8192),
            dtypes=("bf16", "fp32") if quick else ("bf16", "fp16", "fp32", "tf32"),
            concurrency=(1,),
            collective_bytes=_sizes(64 * KB, 64 * MB, 8) if quick else _sizes(4 * KB, 1024 * MB, 4),
            copy_numel=64 * MB if quick else 256 * MB,
            adamw_numel=16 * MB,
            warmup=3,
            repeats=5 if quick else 10,
        )
    levels = tuple(range(1, nproc + 1)) if nproc <= 4 or not quick else tuple(sorted({1, 2, nproc}))
    return ProfileConfig(
        device="cpu",
        nproc=nproc,
        nnodes=nnodes,
        quick=quick,
        matmul_sizes=(32, 64, 128, 256, 512) if quick else (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536),
        dtypes=("fp32",) if quick else ("fp32", "bf16"),
        concurrency=levels,
        collective_bytes=_sizes(4 * KB, 4 * MB, 8) if quick else _sizes(1 * KB, 64 * MB, 4),
        copy_numel=4 * MB if quick else 16 * MB,
        adamw_numel=4 * MB if quick else 16 * MB,  # state well beyond the caches, as in real models
        warmup=1 if quick else 2,
        repeats=3 if quick else 5,
    )


def _sizes(low: int, high: int, factor: int) -> tuple[int, ...]:
    sizes = [low]
    while sizes[-1] * factor <= high:
        sizes.append(sizes[-1] * factor)
    return tuple(sizes)
