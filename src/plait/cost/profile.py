"""The profile format: what `plait profile` measured on a machine, as versioned JSON.

A profile replaces datasheet numbers in the CostModel. It holds matmul times by size, dtype and the number
of ranks computing at once; per-rank rates (per-kernel overhead, memory bandwidth, optimizer) by that
number; collective times among local ranks by op, group size and message size; and how it was measured.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from plait.errors import PlaitError
from plait.fileio import atomic_write
from plait.serde import from_dict, to_dict

PROFILE_VERSION = 1
PROFILE_FORMAT = "plait-profile"

DeviceKind = Literal["cuda", "cpu"]
MeasuredOp = Literal["all_reduce", "all_gather", "reduce_scatter", "broadcast", "p2p", "ring_step"]
MEASURED_OPS: tuple[MeasuredOp, ...] = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "p2p", "ring_step")


class ProfileError(PlaitError):
    """A profile file that is missing, corrupt, of another version or measured on another kind of device."""


@dataclass(frozen=True, kw_only=True)
class DeviceInfo:
    """The measured device: a GPU, or one CPU core per rank."""

    kind: DeviceKind
    name: str  # GPU name or CPU model
    num_devices: int  # GPUs on the machine, or CPU cores this process may use
    memory_bytes: int  # memory of one GPU, or the host's memory


@dataclass(frozen=True, kw_only=True)
class MeasuredProvenance:
    """How and when the numbers were measured."""

    torch_version: str
    backend: str  # collective backend ("gloo", "nccl"), "" when no collectives were measured
    timer: str  # "perf_counter", "cuda_event" (back-to-back calls) or "cuda_event_per_call"
    threads_per_rank: int
    num_ranks: int
    date: str  # ISO 8601
    warmup: int
    repeats: int
    statistic: str = "median"
    quick: bool = False
    host: str = ""
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class MatmulPoint:
    """One GEMM (m x k) @ (k x n): the median time of one call with ``concurrent`` ranks computing at once."""

    dtype: str  # "fp32", "bf16", "fp16", "tf32"
    m: int
    k: int
    n: int
    seconds: float
    concurrent: int = 1

    @property
    def flops(self) -> float:
        """Multiply-adds counted as two FLOPs."""
        return 2.0 * self.m * self.k * self.n

    @property
    def rate(self) -> float:
        """Achieved FLOP/s."""
        return self.flops / self.seconds


@dataclass(frozen=True, kw_only=True)
class RankRates:
    """What one rank achieves while ``concurrent`` ranks of the machine compute at once."""

    concurrent: int
    op_s: float  # one tiny op (an add of two one-element tensors), no autograd
    kernel_s: float  # per kernel of a small block's forward + backward, kernels counted as capture counts them
    copy_bandwidth: float  # bytes/s, read + write, of a large copy
    elementwise_bandwidth: float  # bytes/s, inputs + outputs, of GELU / LayerNorm / add
    adamw_param_s: float | None = None  # AdamW step, per parameter element
    adamw_tensor_s: float | None = None  # AdamW step, per parameter tensor


@dataclass(frozen=True, kw_only=True)
class CollectivePoint:
    """One collective among ranks 0..group_size-1; ``nbytes`` is the full (unsharded) tensor size.

    For all_gather that is the gathered output, for reduce_scatter the input; for p2p the message
    (one way, measured as half a round trip between two ranks); for ring_step the message every rank of the
    group sends to the next one while it receives as much from the previous one, all at once.
    """

    op: MeasuredOp
    group_size: int
    nbytes: int
    seconds: float


@dataclass(frozen=True, kw_only=True)
class SyncPoint:
    """What a small collective right after a compute burst costs beyond its own transfer, on ``group_size``
    CPU ranks that all compute: the wait for the slowest rank and the wake-up of the sleeping ones."""

    group_size: int
    seconds: float


@dataclass(frozen=True, kw_only=True)
class Profile:
    """A measured machine profile (see the module docstring)."""

    device: DeviceInfo
    provenance: MeasuredProvenance
    matmul: tuple[MatmulPoint, ...]
    rates: tuple[RankRates, ...]
    collectives: tuple[CollectivePoint, ...] = ()
    sync: tuple[SyncPoint, ...] = ()  # CPU only: per group size
    host_to_device_bandwidth: float | None = None  # bytes/s, pinned memory (CUDA only)
    device_to_host_bandwidth: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    version: int = PROFILE_VERSION

    def dtypes(self) -> tuple[str, ...]:
        """Matmul dtypes measured, in first-seen order."""
        return tuple(dict.fromkeys(p.dtype for p in self.matmul))

    def concurrency_levels(self) -> tuple[int, ...]:
        """Numbers of ranks computing at once that were measured, ascending."""
        return tuple(sorted({r.concurrent for r in self.rates}))


def profile_to_json(profile: Profile) -> str:
    """The profile's JSON text (a ``format`` tag first, then the fields)."""
    return json.dumps({"format": PROFILE_FORMAT, **to_dict(profile)}, indent=1) + "\n"


def profile_from_json(text: str, *, where: str = "profile") -> Profile:
    """Rebuild a profile from ``profile_to_json`` output; errors name ``where``."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{where} is not valid JSON ({exc}); rerun `plait profile` to write it again") from None
    if not isinstance(raw, dict) or raw.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"{where} is not a plait profile (no \"format\": \"{PROFILE_FORMAT}\"); write one with `plait profile`")
    if raw.get("version") != PROFILE_VERSION:
        raise ProfileError(
            f"{where} has profile version {raw.get('version')!r}; this plait reads version {PROFILE_VERSION}. "
            "Rerun `plait profile` to measure the machine again"
        )
    raw.pop("format")
    try:
        profile = from_dict(Profile, raw)
    except (TypeError, ValueError, KeyError) as exc:
        raise ProfileError(f"{where} does not match the profile format: {exc}; rerun `plait profile`") from None
    validate_profile(profile, where=where)
    return profile


def validate_profile(profile: Profile, *, where: str = "profile") -> None:
    """Check that every number a CostModel needs is present and positive."""
    if not profile.matmul:
        raise ProfileError(f"{where} has no matmul measurements; rerun `plait profile`")
    if not profile.rates:
        raise ProfileError(f"{where} has no per-rank rates (kernel overhead, bandwidth); rerun `plait profile`")
    for p in profile.matmul:
        if min(p.m, p.k, p.n, p.concurrent) < 1 or not p.seconds > 0:
            raise ProfileError(f"{where}: matmul point {p} needs positive sizes and time")
    for r in profile.rates:
        if r.concurrent < 1 or not min(r.op_s, r.kernel_s, r.copy_bandwidth, r.elementwise_bandwidth) > 0:
            raise ProfileError(f"{where}: rates at concurrency {r.concurrent} need positive values, got {r}")
    for sp in profile.sync:
        if sp.group_size < 2 or sp.seconds < 0:
            raise ProfileError(f"{where}: sync point {sp} needs group_size >= 2 and a time >= 0")
    for c in profile.collectives:
        if c.group_size < 2 or c.nbytes < 1 or not c.seconds > 0:
            raise ProfileError(f"{where}: collective point {c} needs group_size >= 2, nbytes >= 1 and a positive time")


def save_profile(profile: Profile, path: str | os.PathLike[str]) -> Path:
    """Write ``profile`` atomically (a temporary file in the same folder renamed over the target)."""
    validate_profile(profile, where=str(path))
    return atomic_write(path, profile_to_json(profile))


def packaged_profile_names() -> list[str]:
    """Names of the profiles shipped with plait (``Cluster.profile: h200``)."""
    folder = resources.files("plait.cost.profiles")
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def load_profile(ref: str | os.PathLike[str]) -> Profile:
    """Load a profile from a file path or a packaged name such as ``h200``."""
    text = os.fspath(ref)
    if not text.endswith(".json") and os.path.sep not in text and "/" not in text:
        names = packaged_profile_names()
        if text not in names:
            raise ProfileError(
                f"unknown packaged profile {text!r}; packaged profiles: {', '.join(names)}. "
                "Give a file path (ending in .json) for a profile written by `plait profile`"
            )
        resource = resources.files("plait.cost.profiles").joinpath(f"{text}.json")
        return profile_from_json(resource.read_text(), where=f"packaged profile {text}")
    path = Path(text)
    if not path.is_file():
        raise ProfileError(
            f"profile file {path} does not exist; measure this machine with `plait profile --out {path}`, "
            "or drop the profile to use datasheet numbers"
        )
    return profile_from_json(path.read_text(), where=f"profile file {path}")
