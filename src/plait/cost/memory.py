"""Memory per device of a data-parallel plan: parameters, gradients, optimizer state, activations, buffers."""

from __future__ import annotations

from plait.graph.model_graph import ModelGraph
from plait.plan.ir import DataParallelKind, MemoryEstimate

OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 1, "sgd_nomomentum": 0}


def memory_estimate(
    graph: ModelGraph,
    *,
    kind: DataParallelKind,
    shard_degree: int,
    micro_batch: int,
    bucket_bytes: int,
    optimizer: str = "adamw",
) -> MemoryEstimate:
    """Bytes one device holds at its peak during a step.

    Replicated: full parameters, gradients (which live in the flat bucket buffers) and optimizer state.
    Sharded (FSDP2): a 1/``shard_degree`` slice of each, plus the largest unit gathered twice
    (the current one and the prefetched next one) and its unsharded gradient.
    """
    params = graph.param_bytes
    states = OPTIMIZER_STATES[optimizer]
    activations = int(graph.activation_bytes * micro_batch / graph.batch_size)
    if kind == "replicate":
        return MemoryEstimate(params=params, grads=params, optimizer=states * params, activations=activations, buffers=0)
    n = max(1, shard_degree)
    largest_unit = max((layer.param_bytes for layer in graph.layers), default=0)
    return MemoryEstimate(
        params=-(-params // n),
        grads=-(-params // n),
        optimizer=states * -(-params // n),
        activations=activations,
        buffers=3 * largest_unit,
    )
