"""The Trainer: seeded build, plan application, the plan's optimizer over micro-batches, metrics, checkpoints, resume.

With ``TrainConfig(adaptive=True)`` it also estimates the gradient noise scale from the norms its plan's
gradients already pass through (``plait.adaptive``; docs/adaptive.md), scales the learning rate by the
configured rule and counts progress in scale-invariant iterations; checkpoints carry that state. With
``adapt_batch_every=N`` (and a ``SampleStream``) it also chooses the batch that maximises predicted goodput every N
steps and applies it in place (``plait.runtime.batch_adapt``).

Plans whose SyncSpecs name a parameter server, SFB or a compressed all-reduce run through ``plait.runtime.sync``
(``AppliedPlan.sync``): each metrics line records the step's bytes, and the synchronizers close (collective)
before the final state is gathered. Checkpoints (and resuming) of parameter-server plans, and adaptive training of
parameter-server or SFB plans, are refused until their state can be gathered and their gradients normed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from plait.adaptive import (
    DEFAULT_REDUCE_EVERY,
    DEFAULT_SMOOTHING,
    LR_SCALING_RULES,
    AdaptiveStats,
    AdaptiveTracker,
    GradNormProbe,
    ProbeLayout,
    resolve_lr_scaling,
)
from plait.adaptive.precondition import PreconditionForm
from plait.data.samples import SampleStream
from plait.errors import PlaitError
from plait.plan.ir import Plan
from plait.runtime import state as rstate
from plait.runtime.apply import AppliedPlan, PlanMismatchError, apply_plan, uses_runtime_sync
from plait.runtime.batch_adapt import BatchAdapter, check_adapt_config, check_adapt_data, preconditioner_for
from plait.runtime.checkpoint import checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from plait.runtime.context import DistContext, init_distributed, teardown
from plait.runtime.data import Batch, DataSource
from plait.runtime.elastic import ElasticFlag
from plait.runtime.envvars import OUT_ENV, RESUME_ENV, adaptive_config_from_env, env_flag
from plait.runtime.metrics import MetricsLog
from plait.runtime.optim import build_optimizer, optimizer_name
from plait.runtime.pipeline_apply import AppliedPipeline, apply_pipeline_plan
from plait.runtime.wfbp import StepTrace

FINAL_FILE = "final.pt"
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
OptimizerFn = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]  # overrides plan.optimizer
Applied = AppliedPlan | AppliedPipeline  # a plan applied to this rank's model (SPMD or pipeline stages)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimizer settings, seeding, logging and checkpoint settings of a training run (the plan picks the optimizer)."""

    steps: int
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)  # adamw, adam
    eps: float = 1e-8  # adamw, adam
    weight_decay: float = 0.01  # decoupled for adamw, an L2 term for adam and sgd
    momentum: float = 0.9  # sgd ("sgd_nomomentum" uses none)
    seed: int = 0
    out_dir: str | None = None  # metrics.jsonl, checkpoints/ and final.pt go here (rank 0 writes)
    checkpoint_every: int = 0  # 0: no checkpoints
    keep_checkpoints: int = 2
    resume: bool = False  # continue from the latest checkpoint in out_dir when there is one
    log_every: int = 1
    progress: bool = True
    title: str = "train"
    adaptive: bool = False  # estimate the gradient noise scale, scale the learning rate, count progress
    lr_scaling: str = "auto"  # adaptive: a rule of plait.adaptive.LR_SCALING_RULES ("auto": the plan's, else by optimizer)
    init_batch_size: int | None = None  # adaptive: the batch M0 the learning rate is tuned for (None: the plan's)
    gns_smoothing: float = DEFAULT_SMOOTHING  # adaptive: the noise-scale averages keep this much per M0 samples
    gns_reduce_every: int = DEFAULT_REDUCE_EVERY  # adaptive: sum this many steps' norms over the ranks at once
    # adaptive batch (plait.runtime.batch_adapt; needs adaptive=True and a SampleStream): every N steps choose the
    # batch that maximises predicted goodput within these bounds and apply it in place (0: off, the plan's batch)
    adapt_batch_every: int = 0
    max_batch_size: int | None = None  # largest global batch (None: 8 x the initial one)
    min_local_batch: int = 1  # micro-batch per data-parallel replica, at least
    max_local_batch: int | None = None  # ... at most (None: what the plan's predicted memory allows)
    max_accumulation: int = 1  # micro-batches per replica and step, at most (1: no accumulation)
    adapt_threshold: float = 0.05  # change the batch only for a predicted goodput gain above this (Pollux: 5 %)
    # adaptive, Adam: the noise scale in Adam's metric; "auto": with Adam/AdamW on replicated plans, plain elsewhere
    gns_preconditioned: bool | Literal["auto"] = "auto"
    gns_precondition_form: PreconditionForm = "metric"  # ... "metric" (Adam's step factor) or "pollux" (plait.adaptive.precondition)

    def __post_init__(self) -> None:
        if self.steps < 0 or self.checkpoint_every < 0:
            raise PlaitError(f"steps ({self.steps}) and checkpoint_every ({self.checkpoint_every}) must not be negative")
        if self.lr_scaling not in LR_SCALING_RULES:
            raise PlaitError(f"lr_scaling {self.lr_scaling!r} is not a rule; use one of {', '.join(LR_SCALING_RULES)}")
        if self.init_batch_size is not None and self.init_batch_size < 1:
            raise PlaitError(f"init_batch_size is {self.init_batch_size}; give a positive number of samples (or None)")
        if not 0.0 <= self.gns_smoothing < 1.0:
            raise PlaitError(f"gns_smoothing is {self.gns_smoothing}; it must be in [0, 1)")
        if self.gns_reduce_every < 1:
            raise PlaitError(f"gns_reduce_every is {self.gns_reduce_every}; give a number of steps, 1 or more")
        if self.checkpoint_every and self.out_dir is None:
            raise PlaitError("checkpoint_every needs out_dir (or `plait run --out DIR`) to know where to write")
        if self.resume and self.out_dir is None:
            raise PlaitError("resume needs out_dir (or `plait run --out DIR`) to find the checkpoints")
        check_adapt_config(self)

    @classmethod
    def from_env(cls, **kwargs: Any) -> TrainConfig:
        """A config whose ``out_dir``, ``resume`` and adaptive settings default to what ``plait run --out/--resume/
        --adaptive/--lr-scaling/--init-batch-size`` set."""
        kwargs.setdefault("out_dir", os.environ.get(OUT_ENV) or None)
        kwargs.setdefault("resume", env_flag(RESUME_ENV))
        for key, value in adaptive_config_from_env().items():
            kwargs.setdefault(key, value)
        return cls(**kwargs)


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What a run did: losses and step times of the steps it ran, and the final parameters."""

    start_step: int  # optimizer steps already done when this run began (from a checkpoint)
    losses: tuple[float, ...]  # one per step run, averaged over ranks
    step_times: tuple[float, ...]  # seconds per step (averaged over the steps between two logged ones)
    final_state: dict[str, torch.Tensor] = field(repr=False)  # full model state dict on rank 0, {} elsewhere
    traces: tuple[StepTrace, ...] = ()  # WFBP timings (replicate plans)
    adaptive: tuple[AdaptiveStats, ...] = ()  # adaptive training: what each step run used (batch, noise scale, ...)
    adaptive_state: dict[str, Any] | None = None  # adaptive training: the final estimator and progress state


class Trainer:
    """Trains ``model_fn()`` with a Plan on the ranks of the current job.

    ``data(step)`` must return the *global* batch of ``step`` (the same on every rank); each rank takes
    its slice per ``plan.batch``. ``data`` may instead be a ``SampleStream`` (``plait.data.samples``): each step
    takes the next global batch of samples from it, and checkpoints keep its position, so a resumed, resized or
    re-batched run continues on the very next sample. ``loss_fn(model, batch)`` returns the mean loss of a micro-batch. The
    optimizer is ``plan.optimizer`` with the config's settings; ``optimizer_fn(params)`` overrides it, but
    a torch AdamW, Adam or SGD it builds must be the plan's (else ``PlanMismatchError``).
    """

    def __init__(
        self,
        *,
        model_fn: Callable[[], nn.Module],
        loss_fn: LossFn,
        data: DataSource | SampleStream,
        plan: Plan,
        config: TrainConfig,
        ctx: DistContext | None = None,
        optimizer_fn: OptimizerFn | None = None,
        before_step: Callable[[int, nn.Module], None] | None = None,
    ) -> None:
        self.model_fn, self.loss_fn, self.data = model_fn, loss_fn, data
        self.plan, self.config, self.ctx = plan, config, ctx
        self.optimizer_fn = optimizer_fn
        self.before_step = before_step
        self.applied: Applied | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.tracker: AdaptiveTracker | None = None  # adaptive training's statistics (None when off)
        self.tracker_note = ""  # why adaptive training has no noise-scale estimate on this plan, if it has none
        self._last_stats: AdaptiveStats | None = None  # what the last step used (adaptive training)
        self._active: DistContext | None = None
        self.adapter: BatchAdapter | None = None  # adaptive batch (adapt_batch_every), once set up
        self.adapter_note = ""  # what the adaptive batch will do, or why the plan keeps its batch
        _check_sync_support(plan, config)
        check_adapt_data(config, data)

    def fit(self) -> TrainResult:
        """Run the remaining steps (all, or those after the latest checkpoint when resuming)."""
        own = self.ctx is None
        ctx = self._active = self.ctx or init_distributed()
        try:
            result = self._fit(ctx)
            # leave together, whoever tears down: a rank leaving gloo early can abort a slower rank's threads
            dist.barrier()
            return result
        finally:
            self._active = None
            if own:
                teardown()

    # ---- set-up ------------------------------------------------------------------------------

    def _setup(self, ctx: DistContext) -> tuple[Applied, torch.optim.Optimizer]:
        cfg = self.config
        torch.manual_seed(cfg.seed)  # the same initial parameters on every rank
        model = self.model_fn()
        applied: Applied = (apply_pipeline_plan(model, self.plan, ctx, self.loss_fn) if self.plan.is_pipeline
                            else apply_plan(model, self.plan, ctx, optimizer_fn=self._optimizer))
        rstate.seed_rank(cfg.seed, step=0, rank=ctx.rank)  # per-rank randomness (dropout) from here on
        optimizer = self._optimizer(applied.trained_parameters())
        self.applied, self.optimizer = applied, optimizer
        self.tracker = self._tracker(applied, optimizer, ctx) if cfg.adaptive else None
        if cfg.adapt_batch_every:
            self.adapter, self.adapter_note = BatchAdapter.create(plan=self.plan, config=cfg, applied=applied,
                                                                  tracker=self.tracker, ctx=ctx)
        return applied, optimizer

    def _tracker(self, applied: Applied, optimizer: torch.optim.Optimizer, ctx: DistContext) -> AdaptiveTracker:
        """Adaptive training's statistics, with a probe installed where the plan's gradients are normed (if any)."""
        cfg, batch = self.config, self.plan.batch
        rule = cfg.lr_scaling
        if rule == "auto" and batch.lr_scaling not in ("none", "auto"):
            rule = batch.lr_scaling  # a rule the plan names
        rule = resolve_lr_scaling(rule, optimizer_name(optimizer) or self.plan.optimizer)
        layout = applied.probe_layout()
        probe: GradNormProbe | None = None
        if isinstance(layout, ProbeLayout):
            probe = GradNormProbe(device=ctx.device)
            applied.attach_probe(probe)
            probe.preconditioner = preconditioner_for(applied, optimizer, cfg.gns_preconditioned,
                                                      cfg.gns_precondition_form)
        else:
            self.tracker_note = f"adaptive: no noise-scale estimate on this plan: {layout}"
        return AdaptiveTracker(init_batch_size=cfg.init_batch_size or batch.global_size, batch_size=batch.global_size,
                               rule=rule, smoothing=cfg.gns_smoothing, probe=probe,
                               layout=layout if isinstance(layout, ProbeLayout) else None,
                               reduce_every=cfg.gns_reduce_every)

    def _optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The plan's optimizer with the config's settings, or what ``optimizer_fn`` builds if it agrees with the plan."""
        cfg, planned = self.config, self.plan.optimizer
        params = list(params)
        if not params:  # parameter servers update every parameter: nothing is left for a local optimizer to step
            return torch.optim.SGD([nn.Parameter(torch.zeros(0))], lr=0.0)
        if self.optimizer_fn is None:
            return build_optimizer(planned, params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum)
        optimizer = self.optimizer_fn(params)
        built = optimizer_name(optimizer)
        if built is not None and built != planned:
            raise PlanMismatchError(
                f"optimizer_fn built {type(optimizer).__name__} ({built!r}) but the plan's memory estimate assumes "
                f"{planned!r}; re-plan with optimizer={built!r} or build the plan's optimizer"
            )
        return optimizer

    def _resume(self, ctx: DistContext, applied: Applied, optimizer: torch.optim.Optimizer) -> tuple[int, str]:
        """Load the latest checkpoint into model and optimizer; the step it was taken after (0 if none) and a note."""
        assert self.config.out_dir is not None
        root = checkpoint_dir(self.config.out_dir)
        # rank 0 reads the pointer, so every rank loads the same checkpoint
        found = rstate.run_on_main(lambda: latest_checkpoint(root), ctx, what="finding the checkpoint to resume from")
        if found is None:
            return 0, "resume: no checkpoint yet; starting from step 0"
        state = load_checkpoint(found)
        step = int(state["step"])
        applied.load_full_state(optimizer, state)
        saved_world = rstate.restore_rng(state.get("rng"), ctx, seed=self.config.seed, step=step)
        note = f"resume: continuing after step {step} (checkpoint of a {saved_world}-rank run)"
        if isinstance(self.data, SampleStream):
            if "data" not in state:
                raise PlaitError(f"the checkpoint {found} holds no sample-stream position (its run read data by step "
                                 "number); resume it with the same step-indexed data source, or start a new run")
            self.data.load_state_dict(state["data"])
            note += f", at sample {self.data.position} (epoch {self.data.epoch})"
        if self.tracker is not None:
            if "adaptive" in state:
                self.tracker.load_state_dict(state["adaptive"])
            else:
                note += "; it holds no adaptive statistics, so the noise scale starts afresh"
            applied.zero_grad(optimizer)  # loading dropped the gradients; the probe's weights are laid out on them
            self.tracker.refresh_weights(optimizer)
        if self.adapter is not None and "batch_adapt" in state:
            self.adapter.load_state_dict(state["batch_adapt"])
            note += f"; adaptive batch {self.adapter.spec.global_size}"
        return step, note

    # ---- the loop ----------------------------------------------------------------------------

    def _fit(self, ctx: DistContext) -> TrainResult:
        cfg = self.config
        applied, optimizer = self._setup(ctx)
        start, note = self._resume(ctx, applied, optimizer) if cfg.resume else (0, "")
        with MetricsLog(
            active=ctx.is_main, total_steps=cfg.steps, start_step=start, out_dir=cfg.out_dir,
            log_every=cfg.log_every, progress=cfg.progress, title=cfg.title, adaptive=self.tracker is not None,
        ) as log:
            for line in (note, self.tracker_note, self.adapter_note):
                if line:
                    log.print(line)
            window = _LossWindow()
            sync = applied.sync if isinstance(applied, AppliedPlan) else None
            elastic = ElasticFlag.for_run(ctx, out_dir=cfg.out_dir, resume=cfg.resume)  # None unless `plait run --elastic`
            for step in range(start, cfg.steps):
                started = time.perf_counter()
                loss = self._step(step, ctx, applied, optimizer)
                window.add(loss, self._last_stats, sync.step_bytes() if sync is not None else None)
                done = step + 1
                if self.adapter is not None:  # measure the step; every adapt_batch_every steps choose the batch
                    self.adapter.after_step(done, started, log)
                checkpoint = cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0
                if checkpoint or log.due(done):  # reduce the losses only here: reading them waits for the device
                    window.close(done, ctx.world_size, log, self.batch_size)
                if checkpoint:
                    self.save(done)
                    window.restart()
                if elastic is not None and done < cfg.steps and elastic.requested():  # a resize: docs/elastic.md
                    if window.pending:
                        window.close(done, ctx.world_size, log, self.batch_size)
                    if not checkpoint:
                        self.save(done)
                    elastic.leave(done, log)
        if self.tracker is not None:
            self.tracker.flush()
        if isinstance(applied, AppliedPlan) and applied.sync is not None:
            applied.sync.close()  # collective: every replica gets the servers' final shards, threads stop
        final = applied.full_model_state()
        if cfg.out_dir is not None:
            path = Path(cfg.out_dir) / FINAL_FILE
            rstate.run_on_main(lambda: rstate.save_tensors_atomic(final, path), ctx, what=f"writing {path}")
        traces = tuple(applied.replicate.traces) if applied.replicate is not None else ()
        return TrainResult(start_step=start, losses=tuple(window.losses), step_times=tuple(window.times), final_state=final,
                           traces=traces, adaptive=tuple(window.stats) if self.tracker is not None else (),
                           adaptive_state=self.tracker.state_dict() if self.tracker is not None else None)

    def _step(self, step: int, ctx: DistContext, applied: Applied, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches; this rank's loss, left on the device."""
        applied.zero_grad(optimizer)
        total = applied.forward_backward(self._global_batch(step), self.loss_fn)
        applied.before_optimizer_step()
        if self.before_step is not None:
            self.before_step(step, applied.model)
        if self.tracker is None:
            optimizer.step()
        else:
            self.tracker.after_backward()
            self._last_stats = self.tracker.optimizer_step(optimizer)
        return total

    @property
    def batch_size(self) -> int:
        """The global batch of the next step: the plan's, or the adaptive batch's current choice."""
        return self.adapter.spec.global_size if self.adapter is not None else self.plan.batch.global_size

    def _global_batch(self, step: int) -> Batch:
        """The global batch of ``step``: from the step-indexed source, or the next samples of the stream."""
        if isinstance(self.data, SampleStream):
            return self.data.next_batch(self.batch_size)
        return tuple(self.data(step))

    def save(self, step: int) -> None:
        """Write the checkpoint of ``step`` (collective: every rank calls it; rank 0 writes)."""
        ctx = self._active
        if ctx is None or self.applied is None or self.optimizer is None:
            raise PlaitError("Trainer.save() works only while fit() runs (it is called every checkpoint_every steps)")
        _check_checkpointable(self.plan)
        model_sd, optim_sd = self.applied.full_state(self.optimizer)
        rng = rstate.gather_rng(ctx)
        cfg = self.config
        extra: dict[str, Any] = {}
        if isinstance(self.data, SampleStream):
            extra["data"] = self.data.state_dict()  # the next sample to read, whatever the next batch size
        if self.tracker is not None:
            self.tracker.flush()  # the statistics include the step just taken
            self.tracker.refresh_weights(self.optimizer)  # as the resumed run will (Adam-weighted norms)
            extra["adaptive"] = self.tracker.state_dict()
        if self.adapter is not None:
            extra["batch_adapt"] = self.adapter.state_dict()  # the adapted batch, its measurements and decisions

        def write() -> Path:
            assert cfg.out_dir is not None
            payload = {
                "step": step, "model": model_sd, "optimizer": optim_sd, "rng": rng, "world_size": ctx.world_size,
                "mesh": dict(zip(self.plan.mesh.axes, self.plan.mesh.shape, strict=True)), "config": asdict(cfg),
                **extra,
            }
            return save_checkpoint(checkpoint_dir(cfg.out_dir), step, payload, keep=cfg.keep_checkpoints)

        rstate.run_on_main(write, ctx, what=f"writing the checkpoint of step {step}")  # also the ranks' barrier


def _ps_param(plan: Plan) -> str | None:
    """The first parameter a parameter server updates, if any."""
    return next((p.name for p in plan.params if p.sync.kind == "ps"), None)


def _check_checkpointable(plan: Plan) -> None:
    """Refuse to checkpoint a parameter-server plan: the servers' optimizer state is not gathered yet."""
    ps = _ps_param(plan)
    if ps is not None:
        raise PlaitError(f"parameter {ps!r} is updated by a parameter server, whose optimizer state plait does not "
                         "gather into a checkpoint yet; train without checkpoint_every or resume, or plan a strategy "
                         "without servers (`plait plan --sync allreduce`, or with compress=bf16)")


def _check_sync_support(plan: Plan, config: TrainConfig) -> None:
    """Refuse, before any communication, what the Trainer cannot do yet with the plan's SyncSpecs."""
    special = [p.name for p in plan.params if p.sync.kind in ("ps", "sfb") or p.sync.compress is not None]
    if plan.is_pipeline and special:
        raise PlanMismatchError(f"parameter {special[0]!r}: the pipeline runtime synchronises its data-parallel "
                                "gradients with the plain all-reduce only; re-plan without --sync")
    if config.checkpoint_every or config.resume:
        _check_checkpointable(plan)
    served = [p for p in plan.params if p.sync.kind in ("ps", "sfb")]
    if config.adaptive and served and uses_runtime_sync(plan):
        raise PlaitError(f"adaptive training is not supported yet with parameter {served[0].name!r} synchronised by "
                         f"{served[0].sync.kind!r}: parameter servers step their own optimizer (the learning-rate "
                         "scale would miss them) and SFB's rebuilt gradients are not normed; train with adaptive=False "
                         "or plan an all-reduce strategy (`plait plan --sync allreduce`)")


class _LossWindow:
    """The steps since the last logged one: losses kept on the device, then reduced over ranks in one go."""

    def __init__(self) -> None:
        self.pending: list[torch.Tensor] = []
        self.pending_stats: list[AdaptiveStats | None] = []
        self.pending_bytes: list[dict[str, int] | None] = []
        self.losses: list[float] = []  # every step's loss, averaged over ranks
        self.times: list[float] = []  # every step's time: its window's time over its number of steps
        self.stats: list[AdaptiveStats] = []  # adaptive training: what every step used
        self.restart()

    def restart(self) -> None:
        """Start timing the next window (after a checkpoint, whose writing is not a step's time)."""
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, stats: AdaptiveStats | None = None, sync_bytes: dict[str, int] | None = None) -> None:
        """One more step's loss on this rank (with adaptive training, its statistics; with ``runtime.sync``, the
        bytes this rank sent and received)."""
        self.pending.append(loss)
        self.pending_stats.append(stats)
        self.pending_bytes.append(sync_bytes)

    def close(self, last_step: int, world_size: int, log: MetricsLog, samples: int) -> None:
        """Average the pending losses over ranks (one all-reduce, one copy to the host), log them and restart.

        Every rank holds the loss of its data-parallel share of the batch (ranks of a model axis hold the
        same one), so the mean over all ranks is the mean over the data-parallel shares.
        """
        total = torch.stack(self.pending)
        dist.all_reduce(total)
        means = [value / world_size for value in total.tolist()]  # waits for the device, so the time below is whole
        step_s = (time.perf_counter() - self.started) / len(means)
        first = last_step - len(means) + 1
        for step, (loss, stats, sent) in enumerate(zip(means, self.pending_stats, self.pending_bytes, strict=True),
                                                   start=first):
            log.log(step, loss, step_s, stats.batch_size if stats is not None else samples, stats, sync_bytes=sent)
        self.losses += means
        self.times += [step_s] * len(means)
        self.stats += [s for s in self.pending_stats if s is not None]
        self.pending.clear()
        self.pending_stats.clear()
        self.pending_bytes.clear()
        self.restart()
