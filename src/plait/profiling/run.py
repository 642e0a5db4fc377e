"""measure_profile(): run the benchmarks on N local ranks and assemble a Profile."""

from __future__ import annotations

import datetime
import platform
import statistics
from collections.abc import Callable
from typing import Any

import torch

from plait.cluster.local import host_memory_bytes, num_cores
from plait.cost.profile import (
    CollectivePoint,
    DeviceInfo,
    MatmulPoint,
    MeasuredProvenance,
    Profile,
    RankRates,
    SyncPoint,
)
from plait.graph import capture
from plait.profiling.bench_compute import tiny_blocks
from plait.profiling.config import ProfileConfig, ProfilingError
from plait.profiling.launch import run_ranks


def tiny_block_kernels() -> list[int]:
    """Forward kernels of each tiny block, counted by capture exactly as it counts them in user models."""
    counts = []
    for module, x in tiny_blocks("meta"):
        graph = capture(module, x, with_ops=False)
        counts.append(sum(layer.num_kernels for layer in graph.layers))
    return counts


def check_device(cfg: ProfileConfig) -> None:
    """Fail early, with the fix, when the requested device is not there."""
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise ProfilingError("--device cuda needs a CUDA GPU, but torch.cuda.is_available() is False; use --device cpu")
        if cfg.nproc > torch.cuda.device_count():
            raise ProfilingError(
                f"--nproc {cfg.nproc} asks for more ranks than the {torch.cuda.device_count()} GPU(s) here; "
                f"use --nproc {torch.cuda.device_count()} or less"
            )


def measure_profile(cfg: ProfileConfig, progress: Callable[[int], None] | None = None) -> Profile:
    """Measure this machine with ``cfg.nproc`` ranks; ``progress`` gets the number of finished steps."""
    check_device(cfg)
    kernels = tiny_block_kernels()
    results = run_ranks(cfg, progress)
    return assemble(cfg, results, kernels)


def assemble(cfg: ProfileConfig, results: list[dict[str, Any]], block_kernels: list[int]) -> Profile:
    """Turn the ranks' raw results into a Profile: medians over busy ranks, the slowest rank per collective."""
    matmul: list[MatmulPoint] = []
    rates: list[RankRates] = []
    for level in cfg.concurrency:
        busy = [r["compute"][str(level)] for r in results if str(level) in r["compute"]]
        matmul.extend(_matmul_points(busy, level))
        rates.append(_rank_rates(busy, level, block_kernels))
    first = results[0]["compute"].get(str(cfg.concurrency[0]), {})
    return Profile(
        device=_device_info(cfg),
        provenance=_provenance(cfg),
        matmul=tuple(matmul),
        rates=tuple(rates),
        collectives=_collective_points(results),
        sync=_sync_points(results),
        host_to_device_bandwidth=first.get("h2d_bandwidth"),
        device_to_host_bandwidth=first.get("d2h_bandwidth"),
    )


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _matmul_points(busy: list[dict[str, Any]], level: int) -> list[MatmulPoint]:
    by_shape: dict[tuple[str, int, int, int], list[float]] = {}
    for rank in busy:
        for row in rank["matmul"]:
            by_shape.setdefault((row["dtype"], row["m"], row["k"], row["n"]), []).append(row["seconds"])
    return [
        MatmulPoint(dtype=d, m=m, k=k, n=n, seconds=_median(ts), concurrent=level) for (d, m, k, n), ts in by_shape.items()
    ]


def _rank_rates(busy: list[dict[str, Any]], level: int, block_kernels: list[int]) -> RankRates:
    # The cost model charges a layer's forward its kernels and its backward twice as many, so the
    # overhead per kernel is a tiny block's forward+backward time over three times its forward kernels.
    block_s = [sum(rank["block_s"]) for rank in busy]
    return RankRates(
        concurrent=level,
        op_s=_median([r["op_s"] for r in busy]),
        kernel_s=_median(block_s) / (3 * sum(block_kernels)),
        copy_bandwidth=_median([r["copy_bandwidth"] for r in busy]),
        elementwise_bandwidth=_median([r["elementwise_bandwidth"] for r in busy]),
        adamw_param_s=_median([r["adamw_param_s"] for r in busy]),
        adamw_tensor_s=_median([r["adamw_tensor_s"] for r in busy]),
    )


def _collective_points(results: list[dict[str, Any]]) -> tuple[CollectivePoint, ...]:
    slowest: dict[tuple[str, int, int], float] = {}
    for rank in results:
        for row in rank["collectives"]:
            key = (row["op"], row["group_size"], row["nbytes"])
            slowest[key] = max(slowest.get(key, 0.0), row["seconds"])
    return tuple(
        CollectivePoint(op=op, group_size=n, nbytes=b, seconds=s)  # type: ignore[arg-type]
        for (op, n, b), s in sorted(slowest.items())
    )


def _sync_points(results: list[dict[str, Any]]) -> tuple[SyncPoint, ...]:
    """The mean over ranks: each rank's extra time is what the step loses on average at a blocking collective."""
    by_size: dict[int, list[float]] = {}
    for rank in results:
        for row in rank.get("sync", []):
            by_size.setdefault(row["group_size"], []).append(row["seconds"])
    return tuple(SyncPoint(group_size=n, seconds=statistics.fmean(v)) for n, v in sorted(by_size.items()))


def _device_info(cfg: ProfileConfig) -> DeviceInfo:
    if cfg.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return DeviceInfo(kind="cuda", name=props.name, num_devices=torch.cuda.device_count(), memory_bytes=props.total_memory)
    return DeviceInfo(kind="cpu", name=_cpu_name(), num_devices=num_cores(), memory_bytes=host_memory_bytes())


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _provenance(cfg: ProfileConfig) -> MeasuredProvenance:
    return MeasuredProvenance(
        torch_version=torch.__version__,
        backend=("nccl" if cfg.device == "cuda" else "gloo") if cfg.nproc >= 2 else "",
        timer="cuda_event" if cfg.device == "cuda" else "perf_counter",
        threads_per_rank=cfg.threads_per_rank,
        num_ranks=cfg.nproc,
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        warmup=cfg.warmup,
        repeats=cfg.repeats,
        statistic="median (compute); mean per call (collectives, sync)",
        quick=cfg.quick,
        host=platform.node(),
    )
