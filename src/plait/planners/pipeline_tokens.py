"""Token slicing as one more variant of a pipeline plan (TeraPipe, ICML'21): the same stages, every micro-batch's
sequence cut into token slices by the slicing DP, priced by the simulator like the other schedules.

It applies to a causal transformer with a sequence axis: a module holding the zoo GPT's causal attention
(``plait.models.gpt.Attention``, what ``plait.runtime.token_pipeline`` slices) whose first input is ``(batch,
sequence)``, on stages without recomputation, of one tensor-parallel size, and one model chunk per rank. Each stage's
work per token and query-key pair comes from ``token_work`` on the layer view captured at a quarter, half and all of
the sequence; a slice's time on a stage is ``runtime_slice_cost`` (the runtime's kernels, the slice's boundary sent
on); the DP's cell is the slowest stage's. A tensor-parallel stage keeps the intra-op ILP's placements: a slice runs
one rank's share of its work (as the ILP's placements share a whole sequence, ``on_stages``) and waits for the
stage's tp collectives (the chosen stage's, per token: they work on activations), and its boundary crosses whole or
as tp slices of a dim after the tokens (``Shard(d)``, ``d >= 2``: the token runtime cannot split a cell's rows or
tokens), whichever is faster for a whole sequence. Every micro-batch (``num_micro`` of the chosen stages'
micro-batching) gets the same slicing: the DP composes ``num_micro`` micro-batches of the stages' size
(``solve_joint``), whose least sum under one ``t_max`` cuts each the same way.

``token_variant`` returns the sliced plan, or why there is none (``TokenVariant.reason``). Slicing removes pipeline
bubble (and adds per-slice overheads), so ``plan_pipeline_full`` tries it only when the best unsliced plan idles at
least ``MIN_BUBBLE`` of its step: a search with many micro-batches per step pays nothing for it. The two extra
captures of the layer view are its main cost (seconds for a billion-parameter model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from plait.cost import CostModel
from plait.graph.model_graph import ModelGraph
from plait.plan.ir import Plan, RankProgram
from plait.plan.placement import REPLICATE, Placement, shard
from plait.planners.intra_op.source import ModelSource
from plait.planners.pipeline import PipelineChoice
from plait.planners.pipeline_lowering import StageWork
from plait.planners.token_cost import (
    SliceCost,
    TokenWork,
    runtime_slice_cost,
    seq_len_of,
    slice_comms,
    slowest_of,
    token_work,
)
from plait.planners.token_slicing import SliceCostFn, SlicingError, SlicingResult, slice_tokens
from plait.planners.token_slicing_lowering import TokenStageWork, lower_token_pipeline

MAX_UNITS = 64  # the DP cuts a sequence at multiples of seq_len / 64 tokens (or finer when that does not divide)
MIN_BUBBLE = 0.03  # the best unsliced plan's bubble below which slicing is not tried (it can win at most that)
MAX_CELLS = 2048  # (micro-batch, slice) cells per step beyond which the variant is not simulated (planning speed)
_ENABLED: ContextVar[bool] = ContextVar("plait_token_slicing", default=True)


def token_slicing_enabled() -> bool:
    """Whether pipeline planning offers token slicing where ``PipelineOptions.token_slicing`` is left unset."""
    return _ENABLED.get()


@contextmanager
def token_slicing(enabled: bool) -> Any:
    """Within the block, pipeline planning offers token slicing (or not) unless its options say otherwise (``plait
    plan --no-token-slicing`` plans this way)."""
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


@dataclass(frozen=True)
class TokenVariant:
    """The token-sliced plan of a pipeline choice and the DP's slicing, or the reason there is none."""

    plan: Plan | None
    slicing: SlicingResult | None = None
    reason: str = ""
    search_s: float = 0.0


def granularity_for(seq_len: int, max_units: int = MAX_UNITS) -> int:
    """The coarsest divisor of ``seq_len`` that leaves at least ``min(seq_len, max_units)`` units (the DP's size)."""
    best = 1
    for g in range(1, seq_len + 1):
        if seq_len % g == 0 and seq_len // g >= min(seq_len, max_units):
            best = g
    return best


def sliceable_problem(source: ModelSource | None, graph: ModelGraph) -> str | None:
    """Why the model cannot be token-sliced by plait's runtime (None when it can)."""
    from torch import nn

    from plait.models.gpt import Attention

    if source is None:
        return "token slicing needs the model's module (a causal transformer), not only its layer view"
    shapes = graph.input_shapes
    if not shapes or len(shapes[0]) != 2:
        return "token slicing needs a (batch, sequence) token input"
    modules = list(source.model.modules())
    if not any(isinstance(m, Attention) for m in modules):
        return "token slicing needs causal attention plait can slice (plait.models.gpt.Attention)"
    other = next((m for m in modules if isinstance(m, nn.MultiheadAttention)
                  or ("attention" in type(m).__name__.lower() and not isinstance(m, Attention))), None)
    if other is not None:
        return f"{type(other).__name__} cannot attend to cached keys and values of earlier slices"
    if seq_len_of(graph) < 4:
        return "the sequence is too short to slice"
    return None


def _with_seq_len(batch: Any, seq: int, new: int) -> Any:
    """``batch`` with every tensor whose second dimension is ``seq`` as an empty meta tensor of ``new`` tokens."""
    import torch

    if isinstance(batch, torch.Tensor):
        if batch.dim() >= 2 and batch.shape[1] == seq:
            return torch.empty((batch.shape[0], new, *batch.shape[2:]), dtype=batch.dtype, device="meta")
        return batch
    if isinstance(batch, tuple | list):
        return type(batch)(_with_seq_len(b, seq, new) for b in batch)
    return batch


def captures(source: ModelSource, graph: ModelGraph) -> list[ModelGraph]:
    """The layer view at a quarter and half of the sequence, and ``graph`` (all of it), at ``graph``'s batch."""
    from plait.graph.capture import capture

    seq = seq_len_of(graph)
    batch = source.batch(graph.batch_size)
    out = [capture(source.model, _with_seq_len(batch, seq, n), name=source.name, loss_fn=source.loss_fn, with_ops=False,
                   autocast=source.autocast) for n in (seq // 4, seq // 2)]
    return [*out, graph]


def stage_token_works(graphs: Sequence[ModelGraph], layer_ranges: Sequence[tuple[int, int]]) -> list[TokenWork]:
    """Each stage's work per token and query-key pair (``token_work`` of its layers)."""
    return [token_work(graphs, layers=range(a, b)) for a, b in layer_ranges]


def on_stages(works: Sequence[TokenWork], choice: PipelineChoice, *, rank_micro: int, seq_len: int) -> list[TokenWork]:
    """``works`` as the choice's stages run them: on a tensor-parallel stage scaled so that their ``1 / tp`` share of
    a whole sequence is what the intra-op ILP's placements leave one rank (``choice.work``, which prices the unsliced
    plan), with its kernels and DTensor's dispatch."""
    if not choice.configs:
        return list(works)
    return [_on_tp_stage(w, sw, c.tp, rank_micro, seq_len) if c.tp > 1 else w
            for w, sw, c in zip(works, choice.work, choice.configs, strict=True)]


def _on_tp_stage(w: TokenWork, sw: StageWork, tp: int, rank_micro: int, seq_len: int) -> TokenWork:
    """One tensor-parallel stage's ``w`` scaled to ``sw`` (its ``StageWork``) for ``rank_micro`` whole sequences."""
    def scaled(poly: tuple[float, float, float], target: float) -> tuple[float, float, float]:
        whole = poly[0] + rank_micro * (poly[1] * seq_len + poly[2] * seq_len * seq_len)
        r = tp * target / whole if whole > 0 else 1.0
        return (poly[0] * r, poly[1] * r, poly[2] * r)

    return replace(w, fwd_flops=scaled(w.fwd_flops, sw.fwd_flops), bwd_flops=scaled(w.bwd_flops, sw.bwd_flops),
                   fwd_bytes=scaled(w.fwd_bytes, sw.fwd_bytes_moved), num_kernels=sw.num_kernels)


def stage_slice_costs(works: Sequence[TokenWork], cost: CostModel, choice: PipelineChoice | None, *, rank_micro: int,
                      seq_len: int, send_splits: Sequence[int] | None = None, dtype: str | None = None
                      ) -> list[SliceCostFn]:
    """Each stage's ``runtime_slice_cost``: with ``choice``, on its tp ranks with its tp collectives per token and its
    boundary crossing as ``send_splits`` says; on GPUs later slices' attention as a fused kernel (``fused_attention``)."""
    last = len(works) - 1
    fused = fused_attention(cost)
    if choice is None or not choice.configs:
        return [runtime_slice_cost(w, cost, last_stage=k == last, dtype=dtype, causal_skip=fused)
                for k, w in enumerate(works)]
    splits = send_splits or [1] * len(works)
    return [runtime_slice_cost(w, cost, last_stage=k == last, dtype=dtype, tp=c.tp, causal_skip=fused,
                               fwd_comms=slice_comms(sw.fwd_comms, rank_micro, seq_len),
                               bwd_comms=slice_comms(sw.bwd_comms, rank_micro, seq_len), send_split=splits[k])
            for k, (w, sw, c) in enumerate(zip(on_stages(works, choice, rank_micro=rank_micro, seq_len=seq_len),
                                               choice.work, choice.configs, strict=True))]


def solve_stages(works: Sequence[TokenWork], cost: CostModel, *, seq_len: int, rank_micro: int, num_micro: int,
                 dtype: str | None = None, granularity: int | None = None, choice: PipelineChoice | None = None,
                 send_splits: Sequence[int] | None = None) -> SlicingResult:
    """The DP's slicing of ``num_micro`` micro-batches of ``rank_micro`` sequences on these stages (one rank's share;
    with ``choice``, on its tensor-parallel stages, see ``stage_slice_costs``)."""
    costs = stage_slice_costs(works, cost, choice, rank_micro=rank_micro, seq_len=seq_len, send_splits=send_splits,
                              dtype=dtype)
    g = granularity or granularity_for(seq_len)
    return slice_tokens(slowest_of(costs), seq_len, len(works), granularity=g, batch=num_micro * rank_micro,
                        micro_sizes=[rank_micro])


def token_send_splits(graph: ModelGraph, choice: PipelineChoice, works: Sequence[TokenWork], cost: CostModel, *,
                      rank_micro: int) -> tuple[int, ...]:
    """How each stage's boundary crosses in the token pipeline: as ``tp`` slices when a dim after the tokens divides
    by ``tp`` and that is faster for a whole sequence (whole or sliced, then all-gathered), else whole (1)."""
    seq, out = seq_len_of(graph), []
    for k, ((_, b), c) in enumerate(zip(choice.layer_ranges, choice.configs, strict=True)):
        shape = graph.layers[b - 1].output_shape
        if c.tp == 1 or k == len(choice.layer_ranges) - 1 or token_split_dim(shape, c.tp) is None:
            out.append(1)
            continue
        tokens = np.array([seq])
        whole, sliced = (float(SliceCost(work=works[k], cost=cost, tp=c.tp, send_split=s).boundary_s(rank_micro, tokens)[0])
                         for s in (1, c.tp))
        out.append(c.tp if sliced < whole else 1)
    return tuple(out)


def token_split_dim(shape: Sequence[int], split: int) -> int | None:
    """The first dim after a boundary's batch and tokens that divides by ``split`` (None when none does)."""
    return next((d for d in range(2, len(shape)) if shape[d] % split == 0), None)


def token_send_placements(shape: Sequence[int], split: int) -> tuple[Placement, ...]:
    """A boundary crossing as ``split`` slices, as placements on a ``dp x tp`` stage mesh (empty: whole)."""
    dim = token_split_dim(shape, split) if split > 1 else None
    return () if dim is None else (REPLICATE, shard(dim))


def fused_attention(cost: CostModel) -> bool:
    """Whether slices after the first are priced with a fused attention kernel that skips masked tiles (a GPU's
    flash attention with the cached tokens' offset) rather than the explicit mask plait's CPU token runtime uses."""
    return cost.cluster.device.kind != "cpu"


def token_programs(works: Sequence[TokenWork], cuts: Sequence[int], choice: PipelineChoice,
                   rank_micro: int, send_splits: Sequence[int] | None = None, *, causal_skip: bool = False
                   ) -> tuple[RankProgram, ...]:
    """The choice's stages lowered as a token pipeline of slicing ``cuts`` (tensor-parallel stages with their tp
    collectives per slice pass, boundaries crossing as ``send_splits`` says: default whole; ``causal_skip``: later
    slices' attention through a fused kernel, see ``fused_attention``)."""
    seq = sum(cuts)
    splits = send_splits or [1] * len(works)
    tps = [c.tp for c in choice.configs] if choice.configs else [1] * len(works)
    stages = [TokenStageWork(work=w, micro=rank_micro, activation_bytes=sw.activation_bytes,
                             transient_bytes=sw.transient_bytes, final_output_bytes=sw.final_output_bytes, tp=tp,
                             causal_skip=causal_skip,
                             send_split=split, fwd_comms=slice_comms(sw.fwd_comms, rank_micro, seq) if tp > 1 else (),
                             bwd_comms=slice_comms(sw.bwd_comms, rank_micro, seq) if tp > 1 else ())
              for w, sw, tp, split in zip(on_stages(works, choice, rank_micro=rank_micro, seq_len=seq),
                                              choice.work, tps, splits, strict=True)]
    return lower_token_pipeline(stages, cuts, choice.stage_ranks, num_micro=choice.num_micro,
                                optimizer_numel=choice.optimizer_numel, sync_bytes=choice.sync_bytes,
                                step_temp_bytes=choice.step_temp_bytes)


def choice_problem(choice: PipelineChoice) -> str | None:
    """Why these stages cannot run as a token pipeline (None when they can)."""
    if choice.chunks != 1:
        return "token slicing runs one model chunk per rank"
    if len({c.tp for c in choice.configs}) > 1:
        return "token slicing runs stages of one tensor-parallel size"
    if any(c.recompute for c in choice.configs):
        return "token slicing does not recompute activations yet"
    return None


def heads_problem(source: ModelSource, choice: PipelineChoice) -> str | None:
    """Why the stages' tensor parallelism cannot slice tokens: a tp size that does not divide an attention's heads."""
    from plait.models.gpt import Attention

    tp = max((c.tp for c in choice.configs), default=1)
    heads = {m.num_heads for m in source.model.modules() if isinstance(m, Attention)}
    odd = sorted(h for h in heads if h % tp)
    if tp > 1 and odd:
        return f"{tp} tensor-parallel ranks do not divide attention's {odd[0]} heads (each caches whole heads)"
    return None


def token_variant(graph: ModelGraph, choice: PipelineChoice, *, source: ModelSource | None, cost: CostModel,
                  dtype: str | None,
                  build: Callable[[PipelineChoice, tuple[RankProgram, ...], tuple[int, ...]], Plan]) -> TokenVariant:
    """The token-sliced plan of ``choice`` (``build(choice, programs, token_slices)`` makes and simulates it; its
    stages' boundaries are then placed as the token pipeline sends them), or why not."""
    import time

    t0 = time.perf_counter()
    problem = sliceable_problem(source, graph) or choice_problem(choice)
    if problem is None and source is not None:
        problem = heads_problem(source, choice)
    if problem is not None:
        return TokenVariant(plan=None, reason=problem)
    assert source is not None
    replicas = len(choice.stage_ranks[0]) // max(1, choice.configs[0].tp) if choice.configs else len(choice.stage_ranks[0])
    rank_micro = max(1, choice.micro_size // max(1, replicas))
    try:
        seen = source.kept(("token_captures", graph.name, graph.batch_size, seq_len_of(graph), graph.dtype),
                           lambda: captures(source, graph))
        works = stage_token_works(seen, choice.layer_ranges)
        seq = seq_len_of(graph)
        splits = token_send_splits(graph, choice, works, cost, rank_micro=rank_micro)
        sliced = solve_stages(works, cost, seq_len=seq, rank_micro=rank_micro, num_micro=choice.num_micro, dtype=dtype,
                              choice=choice, send_splits=splits)
    except (SlicingError, RuntimeError, ValueError, TypeError) as exc:
        return TokenVariant(plan=None, reason=f"token slicing not priced: {exc}", search_s=time.perf_counter() - t0)
    cuts = tuple(sliced.slices[0][1])
    if len(cuts) < 2:
        return TokenVariant(plan=None, slicing=sliced, reason="the slicing DP keeps whole sequences",
                            search_s=time.perf_counter() - t0)
    if len(cuts) * choice.num_micro > MAX_CELLS:
        return TokenVariant(plan=None, slicing=sliced, reason=f"{len(cuts)} slices x {choice.num_micro} micro-batches "
                            f"exceed {MAX_CELLS} cells", search_s=time.perf_counter() - t0)
    whole = replace(choice, work=tuple(replace(w, send_split=1) for w in choice.work))  # placed below, as sent
    plan = build(whole, token_programs(works, cuts, choice, rank_micro, splits, causal_skip=fused_attention(cost)), cuts)
    return TokenVariant(plan=with_token_boundaries(plan, graph, choice, splits), slicing=sliced,
                        search_s=time.perf_counter() - t0)


def with_token_boundaries(plan: Plan, graph: ModelGraph, choice: PipelineChoice, splits: Sequence[int]) -> Plan:
    """``plan`` with its stages' boundaries placed as the token pipeline sends them (``token_send_placements``)."""
    stages = tuple(replace(s, send_placements=token_send_placements(graph.layers[b - 1].output_shape, split))
                   for s, (_, b), split in zip(plan.stages, choice.layer_ranges, splits, strict=True))
    return replace(plan, stages=stages)
