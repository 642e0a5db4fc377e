"""Build the packaged ``h200`` profile from the measurements of one NVIDIA H200.

``python -m plait.profiling.h200 h200_measured.json h200_gemm_measured.json --out h200.json``

The inputs (PyTorch 2.11 + CUDA 13, CUDA events around each call, median of 8-10 runs) hold square
GEMM times, copy and host-link bandwidths, memory-bound op times, the launch of one tiny kernel and
forward / forward+backward times of GPT transformer layers. The conversion:

* GEMM kernel time = measured time - one tiny-kernel launch (each call was timed alone, so the
  launch is inside the measurement), floored at the datasheet peak;
* per-kernel host time = forward+backward time of the launch-bound layers (within 15 % of the
  fastest layer measured) over three times their forward kernels as ``capture`` counts them;
* elementwise bandwidth = median over GELU, LayerNorm and add of inputs+outputs bytes per second.

The transformer-shaped GEMM table is not used: pooled by FLOPs with the square GEMMs it lowered the
accuracy on the layer table (the layer view knows a layer's FLOPs, not its GEMM shapes).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plait.cost.profile import DeviceInfo, MatmulPoint, MeasuredProvenance, Profile, RankRates, save_profile
from plait.graph import capture
from plait.models.gpt import Block, GPTConfig

DTYPES = {"torch.bfloat16": "bf16", "torch.float32": "fp32", "tf32": "tf32"}
DATASHEET_PEAK = {"bf16": 989e12, "fp32": 67e12, "tf32": 494.5e12}  # H200 SXM, dense
ELEMENTWISE_TENSORS = {"gelu": 2, "layernorm4096": 2, "add": 3}  # inputs + outputs per element
LAUNCH_BOUND_WITHIN = 1.15


def gpt_layer_kernels(row: dict[str, Any]) -> int:
    """Forward kernels of one measured GPT layer (bf16), counted by ``capture`` on the meta device."""
    cfg = GPTConfig(vocab_size=512, seq_len=row["T"], num_layers=1, num_heads=row["heads"], hidden=row["h"])
    with torch.device("meta"):
        layer = nn.Sequential(Block(cfg)).to(torch.bfloat16)
    x = torch.empty(row["b"], row["T"], row["h"], dtype=torch.bfloat16, device="meta")
    graph = capture(layer, x, with_ops=False)
    return sum(lay.num_kernels for lay in graph.layers)


def launch_s(gemm: dict[str, Any]) -> float:
    """Seconds of one tiny kernel, launch included, as measured."""
    return float(next(r["s"] for r in gemm["memory_bound_bf16"] if r["op"] == "tiny_add_launch"))


def matmul_points(measured: dict[str, Any], launch: float) -> list[MatmulPoint]:
    """Square GEMMs with the launch taken out of each singly timed call."""
    points = []
    for row in measured["matmul"]:
        dtype, n = DTYPES[row["dtype"]], int(row["n"])
        flops = 2.0 * n**3
        points.append(MatmulPoint(dtype=dtype, m=n, k=n, n=n, seconds=max(row["s"] - launch, flops / DATASHEET_PEAK[dtype])))
    return points


def elementwise_bandwidth(gemm: dict[str, Any]) -> float:
    """Median inputs+outputs bytes per second of the bf16 GELU, LayerNorm and add measurements."""
    rates = [
        ELEMENTWISE_TENSORS[r["op"]] * r["n"] * 2 / r["s"] for r in gemm["memory_bound_bf16"] if r["op"] in ELEMENTWISE_TENSORS
    ]
    return float(statistics.median(rates))


def kernel_s(measured: dict[str, Any]) -> float:
    """Host time per kernel from the launch-bound layers (see the module docstring)."""
    rows = measured["gpt_layer_bf16"]
    fastest = min(r["fwdbwd_s"] for r in rows)
    bound = [r for r in rows if r["fwdbwd_s"] <= LAUNCH_BOUND_WITHIN * fastest]
    return float(statistics.median(r["fwdbwd_s"] / (3 * gpt_layer_kernels(r)) for r in bound))


def h200_profile(measured: dict[str, Any], gemm: dict[str, Any]) -> Profile:
    """The ``h200`` profile from the two measurement files (see the module docstring)."""
    launch = launch_s(gemm)
    total = re.search(r"total_memory=(\d+)MB", measured.get("props", ""))
    memory = int(total.group(1)) * 1024 * 1024 if total else 141 * 10**9
    return Profile(
        device=DeviceInfo(kind="cuda", name=measured["device"], num_devices=1, memory_bytes=memory),
        provenance=MeasuredProvenance(
            torch_version=measured["torch"],
            backend="",
            timer="cuda_event_per_call",
            threads_per_rank=1,
            num_ranks=1,
            date="",
            warmup=1,
            repeats=10,
            host="",
            notes=(
                "converted by plait.profiling.h200 from data/device_profiles/h200_measured.json and "
                "h200_gemm_measured.json (median of 8-10 CUDA-event timed runs after warm-up)",
            ),
        ),
        matmul=tuple(matmul_points(measured, launch)),
        rates=(
            RankRates(
                concurrent=1,
                op_s=launch,
                kernel_s=kernel_s(measured),
                copy_bandwidth=float(measured["d2d_GBps_rw"]) * 1e9,
                elementwise_bandwidth=elementwise_bandwidth(gemm),
            ),
        ),
        host_to_device_bandwidth=float(measured["h2d_GBps_pinned"]) * 1e9,
        device_to_host_bandwidth=float(measured["d2h_GBps_pinned"]) * 1e9,
        notes=(
            "GEMM seconds are kernel times: the singly timed call minus one tiny-kernel launch, floored at the datasheet peak",
            "kernel_s is fitted to the launch-bound GPT layers of h200_measured.json (within 15% of the fastest)",
        ),
    )


def main(argv: list[str] | None = None) -> None:
    """Command line: convert the two measurement files into a profile file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measured", type=Path)
    parser.add_argument("gemm", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    profile = h200_profile(json.loads(args.measured.read_text()), json.loads(args.gemm.read_text()))
    print(f"wrote {save_profile(profile, args.out)}")


if __name__ == "__main__":
    main()
