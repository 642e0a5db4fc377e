"""Adaptive batch size in the Trainer: every N steps, the batch that maximises predicted goodput, applied in place.

``TrainConfig(adaptive=True, adapt_batch_every=N)`` with a ``SampleStream`` as data. The ``BatchAdapter``:

* **measures** every optimizer step's wall time (per configuration: nodes, replicas, micro-batch, accumulation;
  the first step of a run and of a new batch are warm-up and left out) and, with accumulation, the time of the
  non-synchronising micro-batches, into a ``ThroughputModel`` whose prior is plait's CostModel prediction of the
  plan (``cost_model_predictor``);
* **decides** every N steps, on rank 0: refit the model (when it measured a new configuration or a quarter more
  steps since the last fit), take the tracker's smoothed gradient statistics, run
  ``choose_batch`` within the bounds (``max_batch_size``, the local micro-batch range, ``max_accumulation``, and
  the largest micro-batch whose predicted memory fits the device), and keep the current batch unless the choice
  is predicted to raise goodput by more than ``adapt_threshold`` (Pollux's 5 %). Rank 0 broadcasts the decision,
  so every rank applies the same batch;
* **applies** it without a restart: a new ``BatchSpec`` for the applied plan (global batch, micro-batch, number
  of micro-batches), the tracker's batch size (so the AdaScale gain and the learning-rate factor follow) and the
  probe layout of the new split; the Trainer takes that many samples from the stream from the next step on;
* **checkpoints** the current batch, the measurements and the decisions, and restores them on resume.

Pipeline plans keep their number of micro-batches (the schedule's per-rank programs are lowered for it) and
change the micro-batch size: the torch schedule infers its stages' shapes again at the next step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from plait.adaptive import (
    AdamPreconditioner,
    AdaptiveTracker,
    BatchLimits,
    GradParams,
    ProbeLayout,
    ThroughputModel,
    choose_batch,
)
from plait.adaptive.goodput import efficiency
from plait.adaptive.precondition import PRECONDITION_FORMS, PreconditionForm
from plait.adaptive.throughput import cost_model_predictor, fit_prior, load_fitter
from plait.data.samples import SampleStream
from plait.errors import PlaitError
from plait.plan.ir import BatchSpec, Plan
from plait.runtime.apply import AppliedPlan
from plait.runtime.context import DistContext
from plait.runtime.optim import optimizer_name
from plait.runtime.pipeline_apply import AppliedPipeline

DEFAULT_MAX_BATCH_FACTOR = 8  # max_batch_size None: this many times the initial batch
MIN_STATS_UPDATES = 2  # noise-scale updates before the first decision (before them the statistics say nothing)


class AdaptConfig(Protocol):
    """The ``TrainConfig`` fields the adapter reads."""

    @property
    def adaptive(self) -> bool: ...
    @property
    def adapt_batch_every(self) -> int: ...
    @property
    def max_batch_size(self) -> int | None: ...
    @property
    def min_local_batch(self) -> int: ...
    @property
    def max_local_batch(self) -> int | None: ...
    @property
    def max_accumulation(self) -> int: ...
    @property
    def adapt_threshold(self) -> float: ...
    @property
    def steps(self) -> int: ...


def check_adapt_config(cfg: AdaptConfig) -> None:
    """Raise ``PlaitError`` naming what is wrong with the adaptive-batch settings of a training config."""
    pre = getattr(cfg, "gns_preconditioned", "auto")
    if pre not in (True, False, "auto"):
        raise PlaitError(f"gns_preconditioned is {pre!r}; use True, False or 'auto' (Adam's metric where it is known)")
    if pre is True and not cfg.adaptive:
        raise PlaitError("gns_preconditioned needs adaptive=True (it changes how the noise scale is measured)")
    form = getattr(cfg, "gns_precondition_form", "metric")
    if form not in PRECONDITION_FORMS:
        raise PlaitError(f"gns_precondition_form is {form!r}; use one of {', '.join(PRECONDITION_FORMS)}")
    if cfg.adapt_batch_every < 0:
        raise PlaitError(f"adapt_batch_every is {cfg.adapt_batch_every}; give 0 (off) or a number of steps")
    if not cfg.adapt_batch_every:
        return
    if not cfg.adaptive:
        raise PlaitError("adapt_batch_every needs adaptive=True: the batch is chosen from the gradient noise scale "
                         "that adaptive training estimates (and the learning rate follows its gain)")
    if cfg.min_local_batch < 1 or cfg.max_accumulation < 1:
        raise PlaitError(f"min_local_batch ({cfg.min_local_batch}) and max_accumulation ({cfg.max_accumulation}) must "
                         "be at least 1")
    if cfg.max_local_batch is not None and cfg.max_local_batch < cfg.min_local_batch:
        raise PlaitError(f"max_local_batch ({cfg.max_local_batch}) is below min_local_batch ({cfg.min_local_batch})")
    if cfg.max_batch_size is not None and cfg.max_batch_size < 1:
        raise PlaitError(f"max_batch_size is {cfg.max_batch_size}; give a positive number of samples (or None)")
    if cfg.adapt_threshold < 0:
        raise PlaitError(f"adapt_threshold is {cfg.adapt_threshold}; give the predicted goodput gain (e.g. 0.05) a "
                         "new batch must bring")


def preconditioner_for(applied: object, optimizer: torch.optim.Optimizer, setting: bool | str,
                       form: PreconditionForm = "metric") -> AdamPreconditioner | None:
    """The probe's preconditioner for ``TrainConfig.gns_preconditioned``: none for False; for True Adam's (or a
    ``PlaitError`` where it is not supported); for ``"auto"`` Adam's where it is supported, else none."""
    if setting is False:
        return None
    if setting == "auto" and (optimizer_name(optimizer) not in ("adam", "adamw") or not _replicated(applied)):
        return None
    return adam_preconditioner(applied, optimizer, form)


def _replicated(applied: object) -> bool:
    return isinstance(applied, AppliedPlan) and applied.replicate is not None and not applied.model_parallel


def adam_preconditioner(applied: object, optimizer: torch.optim.Optimizer,
                        form: PreconditionForm = "metric") -> AdamPreconditioner:
    """The preconditioner of ``TrainConfig(gns_preconditioned=True)``: Adam or AdamW on a replicated plan (whose
    gradients live in the WFBP buckets' flat buffers across steps), else a ``PlaitError`` saying what to change."""
    if optimizer_name(optimizer) not in ("adam", "adamw"):
        raise PlaitError(f"gns_preconditioned weighs gradients by Adam's second moments, but the optimizer is "
                         f"{type(optimizer).__name__}; train with Adam or AdamW, or set gns_preconditioned=False")
    if not _replicated(applied):
        raise PlaitError("gns_preconditioned is supported on replicated data-parallel plans (WFBP buckets, no tensor "
                         "parallelism) only; plan `--kind replicate` or set gns_preconditioned=False")
    return AdamPreconditioner(form=form)


def check_adapt_data(cfg: AdaptConfig, data: object) -> None:
    """Adaptive batch needs the data as a ``SampleStream``: a step-indexed source has a fixed batch."""
    if cfg.adapt_batch_every and not isinstance(data, SampleStream):
        raise PlaitError("adapt_batch_every needs the data as a plait.data.samples.SampleStream (indexed samples "
                         "read by batches of any size); a step -> batch data source returns one fixed batch size")


def memory_micro_bound(plan: Plan) -> int | None:
    """The largest micro-batch whose predicted memory fits a device, from the plan's own prediction (None: no
    prediction). What the step holds for the whole step (parameters, gradients, optimizer state) stays; everything
    else the prediction counts (activations, buffers, the input) is taken to grow in proportion to the micro-batch,
    which errs safe for larger micro-batches. The plan's own micro-batch is always allowed."""
    pred = plan.predicted
    if pred is None:
        return None
    mem = pred.memory
    static = mem.params + mem.grads + mem.optimizer
    peak = max([*pred.peak_memory_bytes, mem.total])
    per_sample = max(peak - static, 1) / plan.batch.micro_size
    room = plan.cluster.device.memory_bytes - static
    return max(plan.batch.micro_size, int(room // per_sample))


def job_nodes(plan: Plan) -> int:
    """Nodes the plan's ranks span."""
    return max(1, math.ceil(plan.world_size / plan.cluster.devices_per_node))


def build_throughput_model(plan: Plan, micro_sizes: list[int]) -> tuple[ThroughputModel, str]:
    """The plan's throughput model with plait's CostModel prediction as its prior, and where the prior came from."""
    from plait.cost import CostModel  # the cost model is read here only (and only by rank 0)

    graph = plan.model
    try:
        cost = CostModel(plan.cluster)
        per_replica = max(1, plan.world_size // plan.dp_degree)
        predict = cost_model_predictor(
            cost, flops_per_sample=(graph.fwd_flops + graph.bwd_flops) / graph.batch_size, grad_bytes=graph.param_bytes,
            num_params=graph.num_params, kernels_per_step=3 * sum(layer.num_kernels for layer in graph.layers),
            devices_per_replica=per_replica,
        )
        nodes, replicas = job_nodes(plan), plan.dp_degree
        prior = fit_prior(predict, [(nodes, replicas, m) for m in sorted(set(micro_sizes))])
    except (ValueError, PlaitError) as e:  # a plan the predictor cannot price: measurements alone
        return ThroughputModel(None), f"no CostModel prior ({e}); measured step times alone"
    return ThroughputModel(prior), f"CostModel prior ({cost.source})"


@dataclass(frozen=True, kw_only=True)
class Decision:
    """One batch decision: the step it was taken after, the batch before and after, and the predicted goodput gain."""

    step: int
    old: tuple[int, int, int]  # (global batch, micro-batch, micro-batches per step)
    new: tuple[int, int, int]
    predicted_gain: float  # predicted goodput of the new batch over the old one, minus 1
    noise_scale: float

    def describe(self) -> str:
        """``batch: 32 -> 96 (local 24 x 1 accum), predicted goodput +18 %``."""
        g, m, n = self.new
        return (f"batch: {self.old[0]} -> {g} (local {m} x {n} accum), predicted goodput "
                f"{self.predicted_gain * 100:+.0f} % (noise scale {self.noise_scale:.4g}, after step {self.step})")


class BatchAdapter:
    """Chooses and applies the Trainer's batch every ``adapt_batch_every`` steps (see the module docstring)."""

    def __init__(self, *, plan: Plan, config: AdaptConfig, applied: AppliedPlan | AppliedPipeline, tracker: AdaptiveTracker,
                 ctx: DistContext) -> None:
        self.plan, self.config, self.applied, self.tracker, self.ctx = plan, config, applied, tracker, ctx
        self.spec = plan.batch
        self.dp = plan.dp_degree
        # a pipeline keeps its number of micro-batches (its schedule's programs): the model sees a replica's step
        self.fixed_micro = applied.num_micro if isinstance(applied, AppliedPipeline) else None
        if self.fixed_micro is not None:
            self.spec = replace(plan.batch, num_micro=self.fixed_micro,
                                micro_size=plan.batch.global_size // (self.dp * self.fixed_micro))
        self.nodes = job_nodes(plan)
        m0 = int(tracker.init_batch_size)
        self.max_batch = config.max_batch_size or DEFAULT_MAX_BATCH_FACTOR * max(m0, plan.batch.global_size)
        bound = memory_micro_bound(plan)
        hi = config.max_local_batch or self.max_batch // self.dp
        self.memory_bound = bound
        self.max_micro = max(config.min_local_batch, min(hi, bound) if bound is not None else hi)
        self.decisions: list[Decision] = []
        self._warm = False  # the step just measured is a warm-up (first of the run or of a new batch)
        self.model: ThroughputModel | None = None
        self.note = ""
        if ctx.is_main:  # rank 0 decides; the other ranks apply what it broadcasts
            load_fitter()  # now, not at the first decision, while every rank waits
            lo = config.min_local_batch
            n = self.fixed_micro or 1  # a pipeline's model point is a replica's whole step
            self.model, source = build_throughput_model(plan, [n * m for m in (lo, self.spec.micro_size,
                                                                                (lo + self.max_micro) // 2, self.max_micro)])
            mem = f", memory allows {bound}" if bound is not None else ", no memory prediction"
            self.note = (f"adaptive batch: every {config.adapt_batch_every} steps, global <= {self.max_batch}, local "
                         f"{lo}..{self.max_micro}{mem}, up to {config.max_accumulation} micro-batches; {source}")

    @classmethod
    def create(cls, *, plan: Plan, config: AdaptConfig, applied: object, tracker: AdaptiveTracker | None,
               ctx: DistContext) -> tuple[BatchAdapter | None, str]:
        """An adapter for ``applied`` and the line the Trainer prints about it (None for an applied plan it does not
        know, which keeps its batch)."""
        if tracker is None:
            raise PlaitError("adapt_batch_every needs adaptive=True")
        if not isinstance(applied, AppliedPlan | AppliedPipeline):
            return None, f"adaptive batch: {type(applied).__name__} keeps its batch"
        if isinstance(applied, AppliedPlan) and applied.dp_size == 1 and config.max_accumulation < 2:
            raise PlaitError("adaptive batch with one data-parallel replica needs max_accumulation >= 2: the noise scale "
                             "of one replica is measured across its accumulated micro-batches")
        adapter = cls(plan=plan, config=config, applied=applied, tracker=tracker, ctx=ctx)
        return adapter, adapter.note

    # ---- each step ---------------------------------------------------------------------------

    def after_step(self, done: int, started: float, log: Any) -> None:
        """Record the step's time (rank 0) and, every ``adapt_batch_every`` steps, choose and apply the batch."""
        if self.model is not None:
            if self.ctx.device.type == "cuda":
                torch.cuda.synchronize(self.ctx.device)
            end = time.perf_counter()
            if self._warm:
                first_sync = getattr(self.applied, "sync_micro_started", started)  # pipelines: not split
                self._observe(end - started, first_sync - started)
            self._warm = True
        every = self.config.adapt_batch_every
        if done % every == 0 and done < self.config.steps:
            self._decide(done, log)

    def _point(self, spec: BatchSpec) -> tuple[int, int]:
        """(micro-batch, accumulation steps) of ``spec`` as the throughput model sees them (a pipeline's whole step
        per replica, without accumulation)."""
        if self.fixed_micro is not None:
            return spec.micro_size * spec.num_micro, 0
        return spec.micro_size, spec.num_micro - 1

    def _observe(self, step_s: float, accum_s: float) -> None:
        assert self.model is not None
        m, s = self._point(self.spec)
        self.model.observe_iteration(self.nodes, self.dp, m, s, step_s,
                                     min(max(accum_s, 1e-6), 0.99 * step_s) if s else None)

    # ---- deciding ----------------------------------------------------------------------------

    def _choose(self, done: int) -> tuple[tuple[int, int, int], float] | None:
        """Rank 0: the new (global, micro, num_micro) and its predicted goodput gain, or None to keep the batch."""
        assert self.model is not None
        gns = self.tracker.gns
        if gns.num_updates < MIN_STATS_UPDATES or gns.stats.sqr <= 0:
            return None
        if self.model.num_measured:
            try:
                self.model.refit_if_stale()
            except ValueError:
                return None
        m0 = int(self.tracker.init_batch_size)
        grad = GradParams.from_stats(gns.stats, m0)
        n = self.fixed_micro or 1
        limits = BatchLimits(max_batch_size=self.max_batch, min_local_bsz=n * self.config.min_local_batch,
                             max_local_bsz=n * self.max_micro,
                             accumulation=self.fixed_micro is None and self.config.max_accumulation > 1)
        try:
            choice = choose_batch(self.model, grad, m0, self.nodes, self.dp, limits,
                                  max_accum_steps=self.config.max_accumulation - 1 if self.fixed_micro is None else 0,
                                  min_accum_steps=1 if self.dp == 1 and self.fixed_micro is None else 0)
        except ValueError:  # (one replica keeps accumulating: its noise scale is measured across micro-batches)
            return None
        cur = self.spec
        current = predicted_goodput(self.model, grad, m0, self.nodes, self.dp, *self._point(cur), cur.global_size)
        if self.fixed_micro is not None:  # a pipeline: whole micro-batches of its fixed count
            micro = max(1, choice.local_bsz // n)
            new = (self.dp * micro * n, micro, n)
            goodput = predicted_goodput(self.model, grad, m0, self.nodes, self.dp, micro * n, 0, new[0])
        else:
            new = (choice.global_batch, choice.local_bsz, choice.accum_steps + 1)
            goodput = choice.goodput
        gain = goodput / current - 1.0 if current > 0 else math.inf
        if new == (cur.global_size, cur.micro_size, cur.num_micro) or gain <= self.config.adapt_threshold:
            return None
        return new, gain

    def _decide(self, done: int, log: Any) -> None:
        """Rank 0 chooses, every rank receives the choice and applies it."""
        msg = torch.zeros(4, dtype=torch.float64)
        if self.ctx.is_main:
            found = self._choose(done)
            if found is not None:
                (g, m, n), gain = found
                msg = torch.tensor([g, m, n, gain], dtype=torch.float64)
        if self.ctx.world_size > 1:
            wire = msg.to(self.ctx.device)
            dist.broadcast(wire, src=0)
            msg = wire.cpu()
        values = msg.tolist()
        new = (int(values[0]), int(values[1]), int(values[2]))
        if new[0] < 1:
            return
        old = (self.spec.global_size, self.spec.micro_size, self.spec.num_micro)
        decision = Decision(step=done, old=old, new=new, predicted_gain=float(values[3]),
                            noise_scale=self.tracker.gns.noise_scale)
        self.apply(replace(self.spec, global_size=new[0], micro_size=new[1], num_micro=new[2]))
        self.decisions.append(decision)
        log.print(decision.describe())

    def apply(self, spec: BatchSpec) -> None:
        """Train with ``spec`` from the next step on: the applied plan's batch, the tracker's batch and probe layout."""
        self.applied.set_batch(spec)
        self.spec = spec
        layout = self.applied.probe_layout()
        self.tracker.set_batch(spec.global_size, layout if isinstance(layout, ProbeLayout) else None)
        self._warm = False

    def split(self, global_batch: int) -> tuple[int, int, int]:
        """(global, micro, num_micro) closest to ``global_batch`` on this run's replicas: a multiple of the replicas,
        in the fewest micro-batches of at most ``max_micro`` (two at least with one replica)."""
        if self.fixed_micro is not None:
            micro = max(1, global_batch // (self.dp * self.fixed_micro))
            return self.dp * micro * self.fixed_micro, micro, self.fixed_micro
        local = max(1, global_batch // self.dp)
        least = 2 if self.dp == 1 and self.config.max_accumulation >= 2 and local >= 2 else 1
        n = next(k for k in range(least, local + 1) if local % k == 0 and local // k <= self.max_micro) \
            if local > self.max_micro or least > 1 else 1
        return local * self.dp, local // n, n

    # ---- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The current batch, rank 0's measurements and the decisions so far."""
        obs = {} if self.model is None else self.model.observations()
        return {"batch": [self.spec.global_size, self.spec.micro_size, self.spec.num_micro], "observations": obs,
                "decisions": [[d.step, *d.old, *d.new, d.predicted_gain, d.noise_scale] for d in self.decisions]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue with the checkpointed batch, measurements and decisions."""
        g, m, n = (int(v) for v in state["batch"])
        if g != m * n * self.dp:  # saved by a run of another size (elastic resize): the same batch, split anew
            g, m, n = self.split(g)
        self.apply(replace(self.spec, global_size=g, micro_size=m, num_micro=n))
        if self.model is not None:
            self.model.load_observations(state.get("observations", {}))
        self.decisions = [Decision(step=int(d[0]), old=(int(d[1]), int(d[2]), int(d[3])),
                                   new=(int(d[4]), int(d[5]), int(d[6])), predicted_gain=float(d[7]),
                                   noise_scale=float(d[8])) for d in state.get("decisions", [])]


def predicted_goodput(model: ThroughputModel, grad: GradParams, init_batch_size: int, nodes: int, replicas: int,
                      micro: int, accum_steps: int, global_batch: int) -> float:
    """Predicted goodput (initial-batch samples of progress per second) of a configuration."""
    thr = model.throughput(nodes, replicas, micro, accum_steps)
    return float(np.asarray(thr) * efficiency(grad, init_batch_size, global_batch))
