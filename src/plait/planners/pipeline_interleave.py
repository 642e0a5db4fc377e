"""Interleaved 1F1B variants of a chosen pipeline: each rank runs several model chunks (Megatron-LM, SC'21 §2.2).

With ``v`` chunks per rank the layers are cut into ``v x p`` virtual stages of balanced FLOPs, and rank group
``s`` runs virtual stages ``s, s + p, ...``: the bubble shrinks to ``(p - 1) / (v m)`` of the ideal step, at the
price of ``v`` times the boundary transfers and more micro-batches in flight. Each virtual stage keeps its rank
group's configuration (tensor-parallel size, recomputation) and is priced like any stage; whether the variant
is faster and fits is left to the simulator, which runs its lowered interleaved programs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from plait.planners.layer_groups import group_layers
from plait.planners.stage_pricing import PricedStage, StageConfig, StagePricer

if TYPE_CHECKING:
    from plait.planners.pipeline import PipelineChoice  # which builds its variants with this module


def can_interleave(choice: PipelineChoice, num_layers: int, chunks: int) -> bool:
    """Whether ``choice`` can run ``chunks`` model chunks per rank: at least 2 stages of one submesh size and
    tensor-parallel size, micro-batches a multiple of the stages, a layer for every virtual stage."""
    p = len(choice.stage_ranks)
    return (chunks > 1 and p > 1 and choice.chunks == 1 and choice.num_micro % p == 0 and num_layers >= p * chunks
            and len({len(r) for r in choice.stage_ranks}) == 1 and len({c.tp for c in choice.configs}) == 1)


def interleave(choice: PipelineChoice, pricer: StagePricer, chunks: int) -> PipelineChoice:
    """``choice`` with ``chunks`` model chunks per rank (see the module docstring); check ``can_interleave`` first."""
    p, layers = len(choice.stage_ranks), pricer.graph.layers
    ranges = group_layers([float(x.fwd_flops + x.bwd_flops) for x in layers],
                          [float(x.output_bytes) for x in layers[:-1]], p * chunks)
    tp = choice.configs[0].tp
    micro = choice.micro_size // (len(choice.stage_ranks[0]) // tp)
    priced = [_price(pricer, a, b, micro, choice.configs[k % p]) for k, (a, b) in enumerate(ranges)]
    mine = [priced[s::p] for s in range(p)]
    return replace(choice, layer_ranges=tuple(ranges), work=tuple(x.work for x in priced),
                   configs=tuple(x.config for x in priced), chunks=chunks, simulated_s=None, variants=(),
                   sync_bytes=tuple(sum(x.param_bytes for x in m) for m in mine),
                   optimizer_numel=tuple(sum(x.param_numel for x in m) for m in mine),
                   step_temp_bytes=tuple(max(x.step_temp_bytes for x in m) for m in mine))


def _price(pricer: StagePricer, start: int, stop: int, micro: int, config: StageConfig) -> PricedStage:
    """A virtual stage of layers ``[start, stop)``, its boundary sent whole or as slices, whichever is faster."""
    last = stop == len(pricer.graph.layers)
    split = 1 if last else pricer.send_split(stop - 1, micro, config.tp)
    return pricer.price(start, stop, micro, config, last=last, send_split=split)
