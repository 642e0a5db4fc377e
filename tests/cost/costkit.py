"""Synthetic profiles and model graphs for the cost-model tests (numbers chosen for hand computation)."""

from __future__ import annotations

from dataclasses import replace

from plait.cost.profile import (
    CollectivePoint,
    DeviceInfo,
    MatmulPoint,
    MeasuredProvenance,
    Profile,
    RankRates,
)
from plait.graph.model_graph import LayerInfo, ModelGraph, ParamInfo

GB = 1e9


def provenance(**changes: object) -> MeasuredProvenance:
    """A plausible provenance record."""
    base = MeasuredProvenance(
        torch_version="2.13.0", backend="gloo", timer="perf_counter", threads_per_rank=1, num_ranks=2,
        date="2026-01-01T00:00:00+00:00", warmup=1, repeats=3,
    )
    return replace(base, **changes)


def rates(level: int, *, kernel_s: float = 5e-6, copy: float = 20 * GB) -> RankRates:
    """Per-rank rates at one concurrency level."""
    return RankRates(
        concurrent=level, op_s=1e-6, kernel_s=kernel_s, copy_bandwidth=copy, elementwise_bandwidth=copy / 2,
        adamw_param_s=2e-9, adamw_tensor_s=10e-6,
    )


def cpu_profile(*, cores: int = 2, collectives: tuple[CollectivePoint, ...] = ()) -> Profile:
    """A CPU profile with levels 1 and 2: fp32 GEMMs of side 64 (50 GFLOP/s) and 256 (100 GFLOP/s) at level 1,
    half of that at level 2; kernel overhead 5 us at level 1 and 8 us at level 2."""
    matmul = []
    for level, slow in ((1, 1.0), (2, 2.0)):
        for n, rate in ((64, 50e9), (256, 100e9)):
            matmul.append(MatmulPoint(dtype="fp32", m=n, k=n, n=n, seconds=slow * 2 * n**3 / rate, concurrent=level))
    return Profile(
        device=DeviceInfo(kind="cpu", name="test cpu", num_devices=cores, memory_bytes=16 * 2**30),
        provenance=provenance(),
        matmul=tuple(matmul),
        rates=(rates(1), rates(2, kernel_s=8e-6, copy=10 * GB)),
        collectives=collectives,
    )


def alpha_beta_table(op: str, n: int, alpha: float, beta: float, sizes: tuple[int, ...]) -> tuple[CollectivePoint, ...]:
    """Collective points that follow ``alpha + beta * nbytes`` exactly."""
    return tuple(CollectivePoint(op=op, group_size=n, nbytes=s, seconds=alpha + beta * s) for s in sizes)


def tiny_graph(*, batch: int = 4) -> ModelGraph:
    """Two layers: a Linear(4, 6) (weight + bias) and a Linear(6, 3) without bias, fp32."""
    layers = (
        LayerInfo(index=0, name="a", kind="Linear", fwd_flops=2 * batch * 4 * 6, bwd_flops=4 * batch * 4 * 6, num_params=30,
                  param_bytes=120, activation_bytes=batch * 4 * 4, output_bytes=batch * 6 * 4, output_shape=(batch, 6),
                  fwd_bytes_moved=0, num_kernels=1),
        LayerInfo(index=1, name="b", kind="Linear", fwd_flops=2 * batch * 6 * 3, bwd_flops=4 * batch * 6 * 3, num_params=18,
                  param_bytes=72, activation_bytes=batch * 6 * 4, output_bytes=batch * 3 * 4, output_shape=(batch, 3),
                  fwd_bytes_moved=0, num_kernels=1),
    )
    params = (
        ParamInfo(name="a.weight", shape=(6, 4), dtype="fp32", layer=0),
        ParamInfo(name="a.bias", shape=(6,), dtype="fp32", layer=0),
        ParamInfo(name="b.weight", shape=(3, 6), dtype="fp32", layer=1),
    )
    return ModelGraph(name="tiny", dtype="fp32", batch_size=batch, input_shapes=((batch, 4),), layers=layers, params=params,
                      buffer_bytes=16)
