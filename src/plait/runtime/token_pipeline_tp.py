"""Tensor parallelism inside the stages of a token pipeline: what ``plait.runtime.pipeline_tp`` gives, checked for
token slices.

A token stage on ``tp`` ranks is the micro-batch pipeline's ``TensorParallelStage`` (DTensor parameters on the
stage's tp submesh, pinned activations, boundaries crossing as local pieces and redistributed in the receiving
submesh). Token slicing adds the key/value cache: under a head split (Megatron's column-split fused QKV) the
keys and values are DTensors sharded on their heads dimension, so each tp rank caches only its own heads' keys
and values of the earlier slices, and the gradients later slices send into them stay on that rank too.

What a token stage cannot take is refused here (``check_token_tensor_parallel``): a tp size that does not divide
the heads of an attention whose QKV is split by heads (a head would straddle two ranks), and a boundary split on
a cell's rows or tokens (dim 0 or 1: a one-token slice cannot be split; send ``Replicate()`` or ``Shard(d)``,
``d >= 2``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from plait.errors import PlaitError
from plait.models.gpt import Attention
from plait.runtime.pipeline_tp import StageSharding, check_stage_sharding, stage_name
from plait.runtime.token_modules import SlicedAttention

__all__ = ["check_token_tensor_parallel", "token_sharding"]


def token_sharding(tp: int, sharding: StageSharding | None) -> StageSharding | None:
    """The sharding a token pipeline's stages use: ``sharding``; an all-replicated one for ``tp > 1`` without it;
    None (plain stages) for ``tp == 1`` without it."""
    if sharding is None and tp != 1:
        return StageSharding()
    return sharding


def check_token_tensor_parallel(model: nn.Module, stage_layers: Sequence[Sequence[str]], tp: int,
                                sharding: StageSharding) -> None:
    """``PlaitError`` naming what tensor-parallel token stages cannot run: the sharding, a boundary, the heads."""
    check_stage_sharding(sharding, stage_layers, tp, model)
    for s, boundary in enumerate(sharding.boundaries):
        for what, given in (("sent", boundary.sent), ("needed", boundary.needed)):
            if any(p.is_shard and (p.dim is None or p.dim < 2) for p in given):
                raise PlaitError(f"boundary {s} -> {s + 1}: {what} as {list(given)} splits a token cell's rows or "
                                 f"tokens over the tp ranks (a one-token slice cannot be split); a token pipeline's "
                                 f"boundaries are Replicate() or Shard(d) with d >= 2")
    check_heads(model, stage_layers, tp, sharding)


def check_heads(model: nn.Module, stage_layers: Sequence[Sequence[str]], tp: int, sharding: StageSharding) -> None:
    """``PlaitError`` if an attention of the stages has its QKV split by heads into ``tp`` parts that split a head."""
    layers = [name for names in stage_layers for name in names]
    for name, module in model.named_modules():
        if not isinstance(module, Attention | SlicedAttention) or stage_name(name, layers) is None:
            continue
        placed = sharding.placements.get(f"{name}.qkv.weight", ())
        if any(p.is_shard and p.dim == 0 for p in placed) and module.num_heads % tp:
            raise PlaitError(f"{name} has {module.num_heads} heads and its QKV is split by heads over {tp} tp ranks: "
                             f"the tp size must divide the heads (each rank computes and caches whole heads)")
