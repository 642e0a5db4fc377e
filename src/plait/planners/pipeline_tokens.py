"""Token slicing as one more variant of a pipeline plan (TeraPipe, ICML'21): the same stages, every micro-batch's
sequence cut into token slices by the slicing DP, priced by the simulator like the other schedules.

It applies to a causal transformer with a sequence axis: a module holding the zoo GPT's causal attention
(``plait.models.gpt.Attention``, what ``plait.runtime.token_pipeline`` slices) whose first input is ``(batch,
sequence)``, on stages without tensor parallelism or recomputation and one model chunk per rank. Each stage's work
per token and query-key pair comes from ``token_work`` on the layer view captured at a quarter, half and all of the
sequence; a slice's time on a stage is ``runtime_slice_cost`` (the runtime's kernels, the slice's boundary sent on);
the DP's cell is the slowest stage's. Every micro-batch (``num_micro`` of the chosen stages' micro-batching) gets
the same slicing: the DP composes ``num_micro`` micro-batches of the stages' size (``solve_joint``), whose least
sum under one ``t_max`` cuts each the same way.

``token_variant`` returns the sliced plan, or why there is none (``TokenVariant.reason``). Slicing removes pipeline
bubble (and adds per-slice overheads), so ``plan_pipeline_full`` tries it only when the best unsliced plan idles at
least ``MIN_BUBBLE`` of its step: a search with many micro-batches per step pays nothing for it. The two extra
captures of the layer view are its main cost (seconds for a billion-parameter model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from plait.cost import CostModel
from plait.graph.model_graph import ModelGraph
from plait.plan.ir import Plan, RankProgram
from plait.planners.intra_op.source import ModelSource
from plait.planners.pipeline import PipelineChoice
from plait.planners.token_cost import TokenWork, runtime_slice_cost, seq_len_of, slowest_of, token_work
from plait.planners.token_slicing import SlicingError, SlicingResult, slice_tokens
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


def solve_stages(works: Sequence[TokenWork], cost: CostModel, *, seq_len: int, rank_micro: int, num_micro: int,
                 dtype: str | None = None, granularity: int | None = None) -> SlicingResult:
    """The DP's slicing of ``num_micro`` micro-batches of ``rank_micro`` sequences on these stages (one rank's share)."""
    last = len(works) - 1
    slowest = slowest_of([runtime_slice_cost(w, cost, last_stage=k == last, dtype=dtype) for k, w in enumerate(works)])
    g = granularity or granularity_for(seq_len)
    return slice_tokens(slowest, seq_len, len(works), granularity=g, batch=num_micro * rank_micro,
                        micro_sizes=[rank_micro])


def token_programs(works: Sequence[TokenWork], cuts: Sequence[int], choice: PipelineChoice,
                   rank_micro: int) -> tuple[RankProgram, ...]:
    """The choice's stages lowered as a token pipeline of slicing ``cuts``."""
    stages = [TokenStageWork(work=w, micro=rank_micro, activation_bytes=sw.activation_bytes,
                             transient_bytes=sw.transient_bytes, final_output_bytes=sw.final_output_bytes)
              for w, sw in zip(works, choice.work, strict=True)]
    return lower_token_pipeline(stages, cuts, choice.stage_ranks, num_micro=choice.num_micro,
                                optimizer_numel=choice.optimizer_numel, sync_bytes=choice.sync_bytes,
                                step_temp_bytes=choice.step_temp_bytes)


def choice_problem(choice: PipelineChoice) -> str | None:
    """Why these stages cannot run as a token pipeline (None when they can)."""
    if choice.chunks != 1:
        return "token slicing runs one model chunk per rank"
    if any(c.tp > 1 for c in choice.configs):
        return "token slicing does not run tensor-parallel stages yet"
    if any(c.recompute for c in choice.configs):
        return "token slicing does not recompute activations yet"
    return None


def token_variant(graph: ModelGraph, choice: PipelineChoice, *, source: ModelSource | None, cost: CostModel,
                  dtype: str | None, build: Callable[[tuple[RankProgram, ...], tuple[int, ...]], Plan]) -> TokenVariant:
    """The token-sliced plan of ``choice`` (``build(programs, token_slices)`` makes and simulates it), or why not."""
    import time

    t0 = time.perf_counter()
    problem = sliceable_problem(source, graph) or choice_problem(choice)
    if problem is not None:
        return TokenVariant(plan=None, reason=problem)
    assert source is not None
    replicas = len(choice.stage_ranks[0]) // max(1, choice.configs[0].tp) if choice.configs else len(choice.stage_ranks[0])
    rank_micro = max(1, choice.micro_size // max(1, replicas))
    try:
        works = stage_token_works(captures(source, graph), choice.layer_ranges)
        seq = seq_len_of(graph)
        sliced = solve_stages(works, cost, seq_len=seq, rank_micro=rank_micro, num_micro=choice.num_micro, dtype=dtype)
    except (SlicingError, RuntimeError, ValueError, TypeError) as exc:
        return TokenVariant(plan=None, reason=f"token slicing not priced: {exc}", search_s=time.perf_counter() - t0)
    cuts = tuple(sliced.slices[0][1])
    if len(cuts) < 2:
        return TokenVariant(plan=None, slicing=sliced, reason="the slicing DP keeps whole sequences",
                            search_s=time.perf_counter() - t0)
    if len(cuts) * choice.num_micro > MAX_CELLS:
        return TokenVariant(plan=None, slicing=sliced, reason=f"{len(cuts)} slices x {choice.num_micro} micro-batches "
                            f"exceed {MAX_CELLS} cells", search_s=time.perf_counter() - t0)
    plan = build(token_programs(works, cuts, choice, rank_micro), cuts)
    return TokenVariant(plan=plan, slicing=sliced, search_s=time.perf_counter() - t0)
