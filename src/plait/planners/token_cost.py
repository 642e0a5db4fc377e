"""The time of a token slice on one pipeline stage, t(l, c), for the token-slicing DP (TeraPipe, ICML'21 §3.3).

A slice of ``l`` tokens after ``c`` tokens of context runs every layer of the stage on its ``l`` tokens, and its
attention multiplies ``l`` queries against ``l + c`` keys (QK^T and the product with V), so its work is

    q0 + q1 * l + q2 * l * (l + c)        (per sample; q0 does not scale with the batch: parameter traffic)

for each of forward FLOPs, backward FLOPs and forward memory traffic. ``token_work`` reads ``q0, q1, q2`` off
the layer view of the same module captured at three or more sequence lengths (capture's FLOP counter counts
attention's full ``s x s`` square, so a slice counts ``l x (l + c)``; ``causal_skip`` counts the causal part
only, ``l * c + l * (l + 1) / 2``, as fused kernels that skip masked tiles do). ``SliceCost`` prices a stage of
``num_layers`` such layers on the CostModel as ``StagePricer`` prices a stage per micro-batch: forward and
backward compute in the compute dtype (backward moving twice the forward's memory and launching twice its
kernels), Megatron-LM tensor parallelism inside the stage (work over ``tp`` ranks, two all-reduces of the
layer's output per layer in forward and two in backward, or the stage's own collectives per token, ``SliceComm``),
and the slice's boundary activation sent on and its gradient sent back, whole or as ``tp`` slices all-gathered by
the receiver (the faster, or as ``send_split`` says), over the slowest link a boundary of the cluster crosses.

The profiling refinement (the paper's, and its repository's ``latency_model``) is a pure fit: a measured grid
without context ``t(b, l, 0)`` plus a least-squares fit of the extra time of measured points with context on
the features ``[b * l, b * c, b * l * c]``, scored on held-out points (``fit_context``, ``profiled_cost``).
Measuring those points on a machine is the caller's part.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import numpy.typing as npt

from plait.cost import CostModel
from plait.cost.work import CollectiveOp, Comm
from plait.graph.model_graph import ModelGraph
from plait.planners.token_slicing import SliceCostFn, SlicingError, cost_table

Poly = tuple[float, float, float]  # (constant, per token, per query-key pair)
TP_ALLREDUCES_PER_LAYER = 2  # Megatron-LM's block: after attention's proj and after fc2 (forward); again in backward


@dataclass(frozen=True, kw_only=True)
class TokenWork:
    """One sample's work through some layers as polynomials in a slice's tokens and query-key pairs."""

    fwd_flops: Poly
    bwd_flops: Poly
    fwd_bytes: Poly  # memory traffic of the forward (the backward moves twice as much)
    num_kernels: int  # forward kernels per slice (the backward launches twice as many)
    boundary_bytes: float  # per token: the last layer's output (what crosses to the next stage)
    dtype: str


def seq_len_of(graph: ModelGraph) -> int:
    """The sequence length a graph was captured at: the second dim of its first input."""
    shape = graph.input_shapes[0] if graph.input_shapes else ()
    if len(shape) < 2:
        raise SlicingError(f"graph {graph.name!r} has no (batch, sequence, ...) input; capture it on token inputs")
    return int(shape[1])


def token_work(graphs: Sequence[ModelGraph], layers: Sequence[int] | None = None) -> TokenWork:
    """Fit ``TokenWork`` of ``layers`` (default: all) from captures of one module at three or more sequence
    lengths and one batch size; ``SlicingError`` if the work is not quadratic in the sequence length."""
    lengths = [seq_len_of(g) for g in graphs]
    if len(set(lengths)) < 3:
        raise SlicingError(f"token_work needs captures at three or more sequence lengths, got {sorted(set(lengths))}")
    batch = graphs[0].batch_size
    if any(g.batch_size != batch or len(g.layers) != len(graphs[0].layers) for g in graphs):
        raise SlicingError("token_work needs captures of one module at one batch size (only the sequence differs)")
    pick = list(range(len(graphs[0].layers))) if layers is None else list(layers)

    def total(g: ModelGraph, field: str) -> float:
        return float(sum(getattr(g.layers[i], field) for i in pick))

    top = float(max(lengths))
    s = np.array(lengths, dtype=float) / top  # scaled for a well-conditioned fit
    basis = np.stack([np.ones_like(s), batch * s, batch * s * s], axis=1)  # q1, q2 per sample; q0 once per batch

    def fit(field: str) -> Poly:
        y = np.array([total(g, field) for g in graphs])
        coef, *_ = np.linalg.lstsq(basis, y, rcond=None)
        scale = max(float(np.abs(y).max()), 1.0)
        if float(np.abs(basis @ coef - y).max()) > 1e-6 * scale:
            raise SlicingError(f"{field} of the captured layers is not a quadratic in the sequence length; "
                               f"token slicing needs a causal transformer's layers")
        return (float(coef[0]), float(coef[1]) / top, float(coef[2]) / top**2)

    last = graphs[0].layers[pick[-1]]
    per_token = last.output_bytes / (batch * lengths[0])
    return TokenWork(fwd_flops=fit("fwd_flops"), bwd_flops=fit("bwd_flops"), fwd_bytes=fit("fwd_bytes_moved"),
                     num_kernels=int(max(total(g, "num_kernels") for g in graphs)), boundary_bytes=per_token,
                     dtype=graphs[0].dtype)


@dataclass(frozen=True)
class SliceComm:
    """A tensor-parallel collective a slice's pass waits for, per sample and token of the slice."""

    collective: CollectiveOp
    bytes_per_token: float  # the tensor it works on, per sample and token
    temp_per_token: float = 0.0  # buffers held while it runs, per sample and token

    def nbytes(self, micro: int, tokens: int) -> int:
        """The bytes it works on for a slice of ``tokens`` tokens of ``micro`` samples."""
        return int(round(self.bytes_per_token * micro * tokens))

    def temp(self, micro: int, tokens: int) -> int:
        """The buffers it holds while it runs for that slice."""
        return int(round(self.temp_per_token * micro * tokens))


def slice_comms(comms: Sequence[Comm], samples: int, seq_len: int) -> tuple[SliceComm, ...]:
    """A pass's collectives over ``samples`` sequences of ``seq_len`` tokens, per sample and token (a tensor-parallel
    stage's collectives work on activations, which scale with the tokens)."""
    n = max(1, samples * seq_len)
    return tuple(SliceComm(c.collective, c.nbytes / n, c.temp_bytes / n) for c in comms)


@dataclass(frozen=True, kw_only=True)
class SliceCost:
    """t(l, c) of one pipeline stage of ``num_layers`` layers of ``work`` on the CostModel (see the module doc)."""

    work: TokenWork  # one layer (or any stack the stage repeats)
    cost: CostModel
    num_layers: int = 1
    tp: int = 1  # Megatron-LM tensor parallelism inside the stage
    dtype: str | None = None  # compute dtype (default: the captured one)
    causal_skip: bool = False  # count only the causal part of attention (fused kernels skipping masked tiles)
    last_stage: bool = False  # sends nothing on
    # the stage's tensor-parallel collectives per pass (None: Megatron-LM's two all-reduces per layer each way)
    fwd_comms: tuple[SliceComm, ...] | None = None
    bwd_comms: tuple[SliceComm, ...] | None = None
    send_split: int | None = None  # the boundary crosses whole (1) or as tp slices (tp); None: the faster

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.tp < 1:
            raise SlicingError(f"a stage needs num_layers >= 1 and tp >= 1, got {self.num_layers} and {self.tp}")

    def pairs(self, tokens: np.ndarray, context: np.ndarray) -> np.ndarray:
        """Query-key pairs a slice's attention computes."""
        if self.causal_skip:
            return tokens * context + tokens * (tokens + 1) / 2
        return tokens * (tokens + context)

    def compute_s(self, micro: int, tokens: np.ndarray, context: np.ndarray) -> np.ndarray:
        """Forward and backward compute of a slice with its tensor-parallel all-reduces (no boundary)."""
        w, n = self.work, self.num_layers
        tokens, context = np.asarray(tokens, dtype=float), np.asarray(context, dtype=float)
        pairs = self.pairs(tokens, context)

        def amount(p: Poly) -> np.ndarray:
            return n * (p[0] + micro * (p[1] * tokens + p[2] * pairs)) / self.tp

        dtype = self.dtype or w.dtype
        fwd = _compute(self.cost, amount(w.fwd_flops), amount(w.fwd_bytes), dtype, n * w.num_kernels)
        bwd = _compute(self.cost, amount(w.bwd_flops), 2 * amount(w.fwd_bytes), dtype, 2 * n * w.num_kernels)
        return fwd + bwd + self.comms_s(micro, tokens)

    def comms_s(self, micro: int, tokens: np.ndarray) -> np.ndarray:
        """A slice's tensor-parallel collectives, forward and backward."""
        tokens = np.asarray(tokens, dtype=float)
        if self.tp == 1:
            return np.zeros(np.shape(tokens))
        if self.fwd_comms is None and self.bwd_comms is None:
            return 2 * self.num_layers * TP_ALLREDUCES_PER_LAYER * self._allreduce_s(micro * tokens * self.work.boundary_bytes)
        total = np.zeros(np.shape(tokens))
        for c in (*(self.fwd_comms or ()), *(self.bwd_comms or ())):
            total = total + _by_value(micro * tokens * c.bytes_per_token, partial(self._collective_s, c.collective))
        return total

    def _collective_s(self, op: CollectiveOp, nbytes: float) -> float:
        return self.cost.collective_time(op, nbytes, tuple(range(self.tp)))

    def boundary_s(self, micro: int, tokens: np.ndarray) -> np.ndarray:
        """The slice's activation sent to the next stage and its gradient sent back."""
        if self.last_stage:
            return np.zeros(np.shape(tokens))
        nbytes = micro * np.asarray(tokens, dtype=float) * self.work.boundary_bytes
        return 2 * _by_value(nbytes, self._transfer_s)

    def __call__(self, micro: int, tokens: np.ndarray, context: np.ndarray) -> np.ndarray:
        """Seconds of a slice of ``tokens`` after ``context`` tokens for a micro-batch of ``micro`` sequences."""
        return self.compute_s(micro, tokens, context) + self.boundary_s(micro, tokens)

    def table(self, micro: int, num_units: int, granularity: int) -> np.ndarray:
        """``t[l, c]`` in units of ``granularity`` tokens, the DP's input."""
        return cost_table(self, micro, num_units, granularity)

    def _allreduce_s(self, nbytes: np.ndarray) -> np.ndarray:
        group = tuple(range(self.tp))
        return _by_value(nbytes, lambda b: self.cost.collective_time("all_reduce", b, group))

    def _transfer_s(self, nbytes: float) -> float:
        """One direction: whole from rank to rank, or (tensor-parallel stages) as ``tp`` slices then an all-gather
        inside the receiving stage, as ``send_split`` says (default: whichever is faster), over the slowest link
        between two stages."""
        src, dst = _far_ranks(self.cost, self.tp)
        whole = self.cost.p2p_time(nbytes, src, dst)
        if self.tp == 1 or self.send_split == 1:
            return whole
        gather = self.cost.collective_time("all_gather", nbytes, tuple(range(self.tp)))
        split = self.cost.p2p_time(nbytes / self.tp, src, dst) + gather
        return split if self.send_split is not None else min(whole, split)


def _far_ranks(cost: CostModel, tp: int) -> tuple[int, int]:
    """A rank pair across the slowest stage boundary: between nodes when the cluster has several."""
    cluster = cost.cluster
    if cluster.num_nodes > 1:
        return cluster.devices_per_node - 1, cluster.devices_per_node
    return 0, min(tp, cluster.world_size - 1)


def _compute(cost: CostModel, flops: np.ndarray, moved: np.ndarray, dtype: str, kernels: int) -> np.ndarray:
    """``CostModel.compute_time`` over arrays (evaluated once per distinct pair of values)."""
    flops, moved = np.broadcast_arrays(np.asarray(flops, dtype=float), np.asarray(moved, dtype=float))
    pairs, inverse = np.unique(np.stack([flops.ravel(), moved.ravel()], axis=1), axis=0, return_inverse=True)
    times = np.array([cost.compute_time(f, m, dtype=dtype, num_kernels=max(1, kernels)) for f, m in pairs])
    return times[inverse.ravel()].reshape(flops.shape)


def _by_value(values: np.ndarray, fn: Callable[[float], float]) -> np.ndarray:
    """``fn`` over an array, called once per distinct value."""
    values = np.asarray(values, dtype=float)
    unique, inverse = np.unique(values.ravel(), return_inverse=True)
    out = np.array([fn(float(v)) for v in unique])
    return out[inverse.ravel()].reshape(values.shape)


# ---- the profiling refinement ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ContextFit:
    """The extra time of context, ``a * b * l + d * b * c + e * b * l * c``, and how well it predicts."""

    coef: tuple[float, float, float]  # seconds per b * l, b * c, b * l * c
    holdout_error: float  # mean |predicted - measured| / measured over the held-out points (total time)
    max_holdout_error: float
    num_fit: int
    num_holdout: int

    def extra_s(self, micro: int | np.ndarray, tokens: int | np.ndarray, context: int | np.ndarray) -> np.ndarray:
        """The fitted extra time of ``context`` tokens before a slice."""
        b, tok, ctx = (np.asarray(x, dtype=float) for x in (micro, tokens, context))
        return self.coef[0] * b * tok + self.coef[1] * b * ctx + self.coef[2] * b * tok * ctx


def _lookup(no_context: Mapping[tuple[int, int], float], micro: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """``t(b, l, 0)`` from the measured grid; ``SlicingError`` naming a missing point."""
    b, tok = np.broadcast_arrays(np.asarray(micro), np.asarray(tokens))
    out = np.empty(b.shape)
    for idx in np.ndindex(b.shape):
        key = (int(b[idx]), int(tok[idx]))
        if key not in no_context:
            raise SlicingError(f"the no-context grid has no time for micro-batch {key[0]} and {key[1]} tokens; "
                               f"measure it (every slice length the DP may choose)")
        out[idx] = no_context[key]
    return out


def fit_context(no_context: Mapping[tuple[int, int], float], micro: npt.ArrayLike, tokens: npt.ArrayLike,
                context: npt.ArrayLike, measured_s: npt.ArrayLike, *, holdout: float = 0.25,
                seed: int = 0) -> ContextFit:
    """Least squares of ``measured - t(b, l, 0)`` on ``[b * l, b * c, b * l * c]`` over a random ``1 - holdout``
    of the points, scored on the rest (the whole measured time, relative)."""
    b, tok, ctx, t = (np.asarray(x, dtype=float) for x in (micro, tokens, context, measured_s))
    if not (b.shape == tok.shape == ctx.shape == t.shape) or b.ndim != 1:
        raise SlicingError("micro, tokens, context and measured_s must be 1-D and of one length")
    if not 0.0 <= holdout < 1.0:
        raise SlicingError(f"holdout must be in [0, 1), got {holdout}")
    num_holdout = int(round(holdout * len(t)))
    if len(t) - num_holdout < 3:
        raise SlicingError(f"{len(t)} measured points leave fewer than 3 to fit three coefficients; measure more")
    base = _lookup(no_context, b.astype(int), tok.astype(int))
    features = np.stack([b * tok, b * ctx, b * tok * ctx], axis=1)
    order = np.random.default_rng(seed).permutation(len(t))
    test, train = order[:num_holdout], order[num_holdout:]
    coef, *_ = np.linalg.lstsq(features[train], t[train] - base[train], rcond=None)
    if num_holdout:
        rel = np.abs(base[test] + features[test] @ coef - t[test]) / np.abs(t[test])
        mean, worst = float(rel.mean()), float(rel.max())
    else:
        mean = worst = float("nan")
    return ContextFit(coef=(float(coef[0]), float(coef[1]), float(coef[2])), holdout_error=mean,
                      max_holdout_error=worst, num_fit=len(train), num_holdout=num_holdout)


def profiled_cost(no_context: Mapping[tuple[int, int], float], fit: ContextFit, *, num_layers: int = 1,
                  boundary_s: Callable[[int, np.ndarray], np.ndarray] | None = None) -> SliceCostFn:
    """A slice cost from measurements: ``num_layers * (t(b, l, 0) + fit)`` per layer, plus ``boundary_s(b, l)``
    (e.g. ``SliceCost.boundary_s``), for ``slice_tokens``."""
    def cost(micro: int, tokens: np.ndarray, context: np.ndarray) -> np.ndarray:
        per_layer = _lookup(no_context, np.full(np.shape(tokens), micro), tokens) + fit.extra_s(micro, tokens, context)
        edge = boundary_s(micro, np.asarray(tokens)) if boundary_s is not None else 0.0
        return num_layers * per_layer + edge

    return cost


def runtime_slice_cost(work: TokenWork, cost: CostModel, *, last_stage: bool = False, dtype: str | None = None,
                       causal_skip: bool = False, tp: int = 1, fwd_comms: tuple[SliceComm, ...] | None = None,
                       bwd_comms: tuple[SliceComm, ...] | None = None, send_split: int | None = None) -> SliceCostFn:
    """A stage's ``t(l, c)`` as plait's token runtime runs its attention: the first slice (``c = 0``) through the
    causal kernel, which skips masked tiles, later slices attending to the cached keys and values through an
    explicit mask, which computes every pair of ``l x (c + l)`` (or, with ``causal_skip``, a fused kernel that skips
    masked tiles there too). A stage of ``tp`` ranks splits the work over them and waits for ``fwd_comms`` and
    ``bwd_comms`` (``SliceCost``'s fields). ``plait.planners.token_slicing_lowering`` prices a cell the same way."""
    skip = SliceCost(work=work, cost=cost, causal_skip=True, last_stage=last_stage, dtype=dtype, tp=tp,
                     fwd_comms=fwd_comms, bwd_comms=bwd_comms, send_split=send_split)
    full = skip if causal_skip else replace(skip, causal_skip=False)

    def time_of(micro: int, tokens: np.ndarray, context: np.ndarray) -> np.ndarray:
        return np.where(np.asarray(context) == 0, skip(micro, tokens, context), full(micro, tokens, context))

    return time_of


def slowest_of(costs: Sequence[SliceCostFn]) -> SliceCostFn:
    """The DP's cell cost of a pipeline: the slowest stage's time of a slice (the pipeline moves at its pace)."""

    def slowest(micro: int, tokens: np.ndarray, context: np.ndarray) -> np.ndarray:
        return np.max([c(micro, tokens, context) for c in costs], axis=0)

    return slowest
