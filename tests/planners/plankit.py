"""Hand-built model graphs and pinned clusters for the planner tests (no capture, no host facts)."""

from __future__ import annotations

from plait.cluster import Cluster, cluster_from_dict
from plait.graph import LayerInfo, ModelGraph, ParamInfo
from plait.plan import Plan
from plait.plan.layout import shard_axis_of


def dense_graph(num_layers: int = 4, hidden: int = 256, batch: int = 8, *, act_scale: int = 2, name: str = "toy") -> ModelGraph:
    """A stack of ``num_layers`` Linear(hidden, hidden) layers with known FLOPs, bytes and activations."""
    layers, params = [], []
    for i in range(num_layers):
        numel = hidden * hidden + hidden
        layers.append(
            LayerInfo(
                index=i, name=f"layers.{i}", kind="DenseLayer", fwd_flops=2 * batch * hidden * hidden,
                bwd_flops=4 * batch * hidden * hidden, num_params=numel, param_bytes=4 * numel,
                activation_bytes=act_scale * batch * hidden * 4, output_bytes=batch * hidden * 4,
                output_shape=(batch, hidden), fwd_bytes_moved=4 * numel + 2 * batch * hidden * 4, num_kernels=3,
            )
        )
        params.append(ParamInfo(name=f"layers.{i}.fc.weight", shape=(hidden, hidden), dtype="fp32", layer=i))
        params.append(ParamInfo(name=f"layers.{i}.fc.bias", shape=(hidden,), dtype="fp32", layer=i))
    return ModelGraph(name=name, dtype="fp32", batch_size=batch, input_shapes=((batch, hidden),), layers=tuple(layers), params=tuple(params))


def gpu_cluster(num_nodes: int = 1, *, devices: int = 4, memory_gb: float = 80, inter_gb_s: float = 25, name: str = "test-gpu") -> Cluster:
    """A pinned GPU cluster (A100-like numbers) that does not depend on this machine."""
    return cluster_from_dict(
        {
            "name": f"{name}:{num_nodes}",
            "num_nodes": num_nodes,
            "devices_per_node": devices,
            "device": {"name": "gpu", "kind": "cuda", "peak_tflops": {"fp32": 19.5, "bf16": 312},
                       "memory_gb": memory_gb, "memory_bandwidth_gb_s": 2039},
            "links": {"intra_node": {"latency_us": 8, "bandwidth_gb_s": 300},
                      "inter_node": {"latency_us": 12, "bandwidth_gb_s": inter_gb_s}},
        },
        where="test",
    )


def dp_kind(plan: Plan) -> str:
    """The data-parallel choice a plan's placements express: replicate, fsdp or hybrid."""
    axis = shard_axis_of(plan)
    if axis is None:
        return "replicate"
    return "hybrid" if len(plan.data_parallel_axes) > 1 else "fsdp"


def candidate_kind(name: str) -> str:
    """The data-parallel choice a candidate's name starts with."""
    return name.split(",")[0]
