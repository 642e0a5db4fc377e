"""Time to a target validation loss: the Trainer's adaptive batch against three fixed batch sizes, in one run.

Three tasks, each trained by the Trainer on N local gloo ranks (replicated data parallelism, WFBP buckets) from the
same initial parameters and the same seeded sample order (``SampleStream``):

* ``mlp``: 10-class classification of 2^20 Gaussian inputs labelled by a random linear teacher, 10 % of the labels
  replaced by random classes (so the gradient noise scale grows as the loss nears the noise floor), by an MLP
  32 -> 512 -> 512 -> 10 (small enough that a small batch's step is mostly per-step overhead on a CPU), trained
  with SGD (momentum 0.9) and AdaScale's rule (``lr x gain``);
* ``gpt``: the demo GPT (``plait.demo.DemoJob``'s model and generated corpus, made small: 2 layers, hidden 64,
  sequence 32) as a character language model, windows of the corpus as samples, 10 % held out, trained with AdamW
  and the ``adamscale`` rule (``lr x sqrt(gain)``), its noise scale measured in Adam's metric (the default
  ``gns_preconditioned="auto"``);
* ``mlp-adamw``: the MLP task under AdamW, reported as the case the goodput model does not yet win (under AdamW
  large batches are worth more than the noise scale says there; docs/adaptive.md).

For each task four runs per round (three rounds by default, in rotated order; the median time counts): the
adaptive batch (``TrainConfig(adaptive=True, adapt_batch_every=N)``, starting at the smallest batch ``M0``,
bounded by the largest fixed batch) and the fixed small, medium and large batches. Every run of a task uses the
**same learning-rate rule**, with the learning rate tuned for ``M0`` and scaled by the gain the same estimator
measures, so a fixed batch gets the learning rate the rule gives its batch, exactly as the adaptive batch does at
that size. The validation loss is taken every ``eval_samples`` training samples (the evaluation's time is left
out of the wall time, and out of the step times the adaptive batch's throughput model sees); a run stops when it
reaches the target, or at its sample or time cap. Reported: training wall time to the target, samples and steps
to it, the adaptive run's batch decisions, and the statistics' overhead (the CPU time in the noise-scale code over
the process's CPU time, and the time rank 0 spends refitting and choosing).

    python bench/adaptive.py --nproc 4 --json out/adaptive.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from plait.adaptive import AdamPreconditioner, AdaptiveTracker, GradNormProbe
from plait.cluster import local_cluster
from plait.data.samples import SampleStream, TensorSamples
from plait.demo.job import DemoJob
from plait.graph.capture import capture
from plait.models.gpt import lm_loss
from plait.models.mlp import MLP, MLPConfig
from plait.plan import Plan
from plait.planners import build_dp_plan
from plait.runtime import TrainConfig, Trainer, init_distributed, run_ranks, teardown
from plait.runtime.batch_adapt import BatchAdapter

RUNS = ("adaptive", "small", "medium", "large")


@dataclass(frozen=True, kw_only=True)
class Task:
    """One task's batch sizes, learning rate, target and caps."""

    name: str
    batches: tuple[int, int, int]  # fixed small (= M0, the adaptive run's start), medium, large (= adaptive's max)
    lr: float  # AdamW learning rate at M0
    target: float  # validation loss to reach
    eval_samples: int  # evaluate every this many training samples
    max_samples: int  # stop a run that has not reached the target after this many samples
    adapt_every: int  # the adaptive run decides every this many steps
    max_s: float = 240.0  # ... or after this much training time
    optimizer: str = "adamw"  # adamw (learning rate x sqrt(gain): adamscale) or sgd (momentum 0.9, x gain: adascale)
    preconditioned: bool | str = "auto"  # the noise scale in Adam's metric (gns_preconditioned; auto: with AdamW)
    precondition_form: str = "metric"  # ... as Adam's step factor weighs them, or "pollux" (gns_precondition_form)
    gns_smoothing: float = 0.999  # the noise-scale averages keep this weight per M0 samples (TrainConfig's default)


TASKS = {
    # SGD with momentum and AdaScale, the setting the goodput model is derived for; lr tuned at M0 by single-process
    # runs to the target (0.01: 516 k samples, 0.03: 418 k, 0.1: not reached in 1.5 M)
    "mlp": Task(name="mlp", batches=(32, 512, 8192), lr=0.03, target=0.72, eval_samples=4096, max_samples=4_000_000,
                adapt_every=10, max_s=40.0, optimizer="sgd"),
    # the same task under AdamW (lr tuned the same way: 1e-3 332 k, 2e-3 246 k, 4e-3 332 k): reported, not a target
    # (the noise-scale efficiency undervalues large batches under AdamW here; docs/adaptive.md)
    "mlp-adamw": Task(name="mlp-adamw", batches=(32, 512, 8192), lr=2e-3, target=0.72, eval_samples=4096,
                      max_samples=4_000_000, adapt_every=10, max_s=40.0),
    # the time cap leaves the best fixed batch room on a slower machine (it took 36-41 s on an AMD EPYC VM)
    "gpt": Task(name="gpt", batches=(16, 64, 512), lr=3e-3, target=0.40, eval_samples=2048, max_samples=1_000_000,
                adapt_every=10, max_s=60.0),
}


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What one benchmark run measures."""

    nproc: int = 4
    tasks: tuple[str, ...] = ("mlp", "gpt", "mlp-adamw")
    runs: tuple[str, ...] = RUNS
    rounds: int = 3  # every run this many times; the median time counts
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # per task: Task fields to change


# ---- the tasks ------------------------------------------------------------------------------------

MLP_CFG = MLPConfig(in_dim=32, hidden=512, num_layers=2, out_dim=10)
MLP_TRAIN, MLP_VAL, LABEL_NOISE = 1 << 20, 8192, 0.1  # enough samples that no run repeats many (no memorising)
GPT_JOB = DemoJob(num_layers=2, num_heads=2, hidden=64, seq_len=32, lr=3e-3)


def ce_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Cross-entropy of ``model`` on ``(inputs, labels)``."""
    x, y = batch
    return F.cross_entropy(model(x), y)


class HalfSamples(TensorSamples):
    """Inputs stored in half precision (a million samples in 64 MB), read as float32."""

    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, y = super().take(indices)
        return x.float(), y


@functools.cache
def mlp_data() -> tuple[TensorSamples, tuple[torch.Tensor, torch.Tensor]]:
    """Training samples and the validation set: a random teacher's labels, ``LABEL_NOISE`` of them random."""
    g = torch.Generator().manual_seed(1234)
    n = MLP_TRAIN + MLP_VAL
    x = torch.randn(n, MLP_CFG.in_dim, generator=g)
    w = torch.randn(MLP_CFG.in_dim, MLP_CFG.out_dim, generator=g)
    y = (x @ w).argmax(dim=1)  # a linear teacher: learnable to the label-noise floor
    noisy = torch.rand(n, generator=g) < LABEL_NOISE
    y = torch.where(noisy, torch.randint(0, MLP_CFG.out_dim, (n,), generator=g), y)
    return HalfSamples(x[:MLP_TRAIN].half(), y[:MLP_TRAIN]), (x[MLP_TRAIN:], y[MLP_TRAIN:])


@functools.cache
def gpt_data() -> tuple[TensorSamples, tuple[torch.Tensor, torch.Tensor]]:
    """Windows of the demo corpus (stride half a window) as samples; the last 10 % of the text for validation."""
    tokens = GPT_JOB.tokenizer.encode(GPT_JOB.text)
    cut = int(len(tokens) * 0.9)
    n = GPT_JOB.seq_len

    def windows(t: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.arange(0, len(t) - n - 1, stride)
        w = t[starts[:, None] + torch.arange(n + 1)[None, :]]
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    return TensorSamples(*windows(tokens[:cut], n // 2)), windows(tokens[cut:], n)


def task_parts(name: str) -> tuple[Callable[[], nn.Module], Callable[..., torch.Tensor], TensorSamples,
                                   tuple[torch.Tensor, torch.Tensor]]:
    """Model builder, loss, training samples and validation set of a task."""
    if name.startswith("mlp"):
        return (lambda: MLP(MLP_CFG)), ce_loss, *mlp_data()
    return GPT_JOB.build_model, lm_loss, *gpt_data()


def make_plans(s: Settings, task: Task) -> dict[int, Plan]:
    """A replicated plan per batch size of the task, captured on the meta device and planned for the local ranks."""
    model_fn, loss_fn, samples, _ = task_parts(task.name)
    with torch.device("meta"):
        model = model_fn()
    example = tuple(t[: task.batches[0] // s.nproc].to("meta") for t in samples.take(torch.arange(task.batches[0])))
    graph = capture(model, example, name=f"bench-{task.name}", loss_fn=loss_fn)
    cluster = local_cluster(s.nproc)
    return {b: build_dp_plan(graph, cluster, kind="replicate", global_batch=b, optimizer=task.optimizer)
            for b in task.batches}


# ---- one rank -------------------------------------------------------------------------------------

SPENT = {"stats": 0.0, "decide": 0.0, "choose": 0.0}  # CPU s in the noise-scale code; wall s deciding (with the
# broadcast of the decision) and, of that, choosing (refit and search, rank 0)
EVAL = {"step": 0.0}  # evaluation seconds inside the current step (taken out of the adapter's measurement)


def _timed(fn: Any, part: str, clock: Callable[[], float]) -> Any:
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[part] += clock() - t0

    return timed


def instrument() -> None:
    """Time the statistics code (CPU, this thread), the adapter's decisions (wall), and keep evaluations out of the
    adapter's step times."""
    for owner, name in ((GradNormProbe, "add_local"), (GradNormProbe, "add_synced"), (AdaptiveTracker, "after_backward"),
                        (AdamPreconditioner, "refresh")):
        setattr(owner, name, _timed(getattr(owner, name), "stats", time.thread_time))
    BatchAdapter._decide = _timed(BatchAdapter._decide, "decide", time.perf_counter)  # type: ignore[method-assign]
    BatchAdapter._choose = _timed(BatchAdapter._choose, "choose", time.perf_counter)  # type: ignore[method-assign]
    observe = BatchAdapter.after_step

    def after_step(self: BatchAdapter, done: int, started: float, log: Any) -> None:
        observe(self, done, started + EVAL["step"], log)
        EVAL["step"] = 0.0

    BatchAdapter.after_step = after_step  # type: ignore[method-assign]


class _Stop(Exception):
    """Raised on every rank at the same step: the run reached its target or a cap."""


class _Evaluator:
    """``before_step``: every ``eval_samples`` training samples, the validation loss (each rank a shard, summed)."""

    def __init__(self, task: Task, stream: SampleStream, val: tuple[torch.Tensor, torch.Tensor], loss_fn: Any,
                 rank: int, world: int) -> None:
        self.task, self.stream, self.loss_fn = task, stream, loss_fn
        self.val = tuple(t[rank::world] for t in val)
        self.next = 0
        self.start = time.perf_counter()
        self.eval_s = 0.0
        self.curve: list[dict[str, float]] = []
        self.reached: dict[str, float] | None = None
        self.steps = 0
        self.trainer: Trainer | None = None

    def train_s(self) -> float:
        return time.perf_counter() - self.start - self.eval_s

    def __call__(self, step: int, model: nn.Module) -> None:
        self.steps = step + 1
        seen = self.stream.position
        if seen < self.next:
            return
        t0 = time.perf_counter()
        self.next = seen + self.task.eval_samples
        with torch.no_grad():
            total = torch.zeros(3, dtype=torch.float64)
            for i in range(0, len(self.val[0]), 512):
                part = tuple(t[i:i + 512] for t in self.val)
                total[0] += float(self.loss_fn(model, part)) * len(part[0])
                total[1] += len(part[0])
            total[2] = self.train_s()
            dist.all_reduce(total)
        val_loss = float(total[0] / total[1])
        train_s = float(total[2]) / dist.get_world_size()
        point = {"train_s": train_s, "samples": float(seen), "steps": float(step + 1), "val_loss": val_loss}
        if self.trainer is not None and self.trainer.tracker is not None:
            point["batch"] = float(self.trainer.batch_size)
            point["noise_scale"] = self.trainer.tracker.gns.noise_scale
        self.curve.append(point)
        spent = time.perf_counter() - t0
        self.eval_s += spent
        EVAL["step"] += spent
        if val_loss <= self.task.target:
            self.reached = point
            raise _Stop
        if seen >= self.task.max_samples or train_s >= self.task.max_s:
            raise _Stop


def _one_run(task: Task, run: str, plans: dict[int, Plan], ctx: Any) -> dict[str, Any]:
    model_fn, loss_fn, samples, val = task_parts(task.name)
    stream = SampleStream(samples, seed=7)
    small, _, large = task.batches
    batch = small if run in ("adaptive", "small") else task.batches[RUNS.index(run) - 1]
    adapt: dict[str, Any] = {}
    if run == "adaptive":
        adapt = {"adapt_batch_every": task.adapt_every, "max_batch_size": large, "max_local_batch": large // ctx.world_size}
    config = TrainConfig(steps=10**7, lr=task.lr, weight_decay=0.0, seed=0, progress=False, log_every=10**7,
                         adaptive=True, lr_scaling="auto", init_batch_size=small, momentum=0.9,
                         gns_preconditioned=task.preconditioned,
                         gns_precondition_form=task.precondition_form, gns_smoothing=task.gns_smoothing, **adapt)
    evaluator = _Evaluator(task, stream, val, loss_fn, ctx.rank, ctx.world_size)
    trainer = Trainer(model_fn=model_fn, loss_fn=loss_fn, data=stream, plan=plans[batch], config=config, ctx=ctx,
                      before_step=evaluator)
    evaluator.trainer = trainer
    for k in SPENT:
        SPENT[k] = 0.0
    dist.barrier()
    cpu0 = time.process_time()
    evaluator.start = time.perf_counter()
    with contextlib.suppress(_Stop):  # every rank stops at the same step
        trainer.fit()
    cpu = time.process_time() - cpu0
    wall = evaluator.train_s()
    dist.barrier()
    adapter = trainer.adapter
    return {
        "run": run, "batch": batch, "reached": evaluator.reached, "curve": evaluator.curve, "steps": evaluator.steps,
        "decisions": [d.describe() for d in adapter.decisions] if adapter is not None else [],
        "final_batch": trainer.batch_size, "stats_cpu_share": SPENT["stats"] / cpu if cpu > 0 else 0.0,
        "decide_share": SPENT["decide"] / wall if wall > 0 else 0.0, "decide_s": SPENT["decide"],
        "choose_share": SPENT["choose"] / wall if wall > 0 else 0.0, "choose_s": SPENT["choose"],
        "noise_scale": trainer.tracker.gns.noise_scale if trainer.tracker is not None else None,
    }


def bench_rank(s: Settings, plans: dict[str, dict[int, Plan]]) -> dict[str, list[dict[str, Any]]]:
    """Every task's runs on this rank, one after the other."""
    instrument()
    ctx = init_distributed()
    out: dict[str, list[dict[str, Any]]] = {}
    try:
        for name in s.tasks:
            task = _task(s, name)
            out[name] = []
            for r in range(s.rounds):  # the order rotates each round, so slow phases of a loaded machine spread out
                order = s.runs[r % len(s.runs):] + s.runs[:r % len(s.runs)]
                out[name] += [{**_one_run(task, run, plans[name], ctx), "round": r} for run in order]
    finally:
        teardown()
    return out


def _task(s: Settings, name: str) -> Task:
    from dataclasses import replace

    return replace(TASKS[name], **s.overrides.get(name, {}))


# ---- report -----------------------------------------------------------------------------------------

def report(s: Settings, results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Print the table and return the JSON record."""
    console = Console()
    record: dict[str, Any] = {"settings": asdict(s), "tasks": {}}
    for name, runs in results.items():
        task = _task(s, name)
        rule = "adamscale: lr x sqrt(gain)" if task.optimizer == "adamw" else "adascale: lr x gain"
        table = Table(title=f"{name}: training time to validation loss {task.target} on {s.nproc} gloo ranks "
                            f"({task.optimizer} lr {task.lr} at M0={task.batches[0]}, {rule} for every run; "
                            f"median of {s.rounds} rounds)")
        for col in ("run", "batch", "time to target (s)", "per round (s)", "samples", "steps", "best val loss",
                    "vs best fixed"):
            table.add_column(col)
        per_round: dict[str, list[float]] = {}
        for r in runs:
            per_round.setdefault(r["run"], []).append(r["reached"]["train_s"] if r["reached"] else math.inf)
        times = {k: statistics.median(v) for k, v in per_round.items()}
        fixed = sorted(times[k] for k in RUNS[1:] if k in times)
        best = fixed[0] if fixed else math.inf
        median = statistics.median(fixed) if fixed else math.inf
        for run in [k for k in RUNS if k in times]:
            t = times[run]
            mine = [r for r in runs if r["run"] == run]
            reached = [r["reached"] for r in mine if r["reached"]]
            best_val = min((p["val_loss"] for r in mine for p in r["curve"]), default=math.nan)
            batch = (f"{mine[0]['batch']} -> " + "/".join(str(r["final_batch"]) for r in mine) if run == "adaptive"
                     else str(mine[0]["batch"]))
            table.add_row(run, batch, f"{t:.1f}" if math.isfinite(t) else "not reached",
                          " / ".join(f"{x:.1f}" for x in per_round[run]),
                          f"{statistics.median(p['samples'] for p in reached):.0f}" if reached else "-",
                          f"{statistics.median(p['steps'] for p in reached):.0f}" if reached else "-",
                          f"{best_val:.4f}", f"{t / best:.2f}x" if math.isfinite(t) and math.isfinite(best) else "-")
        console.print(table)
        adas = [r for r in runs if r["run"] == "adaptive"]
        ada = adas[0] if adas else None
        if ada is None:
            record["tasks"][name] = {"task": asdict(task), "runs": runs, "time_to_target_s": times}
            continue
        for line in ada["decisions"]:
            console.print(f"  round 0: {line}")
        share = {k: statistics.median(r[k] for r in adas) for k in ("stats_cpu_share", "decide_share", "decide_s",
                                                                      "choose_s")}
        ok_best, ok_median = times["adaptive"] <= best, times["adaptive"] < median
        console.print(f"  adaptive {times['adaptive']:.1f} s; best fixed {best:.1f} s, median fixed {median:.1f} s: "
                      f"{'no slower than' if ok_best else 'SLOWER than'} the best, "
                      f"{'faster than' if ok_median else 'NOT faster than'} the median. Statistics' CPU share "
                      f"{share['stats_cpu_share'] * 100:.2f} %; batch decisions {share['decide_share'] * 100:.2f} % of "
                      f"the training time on rank 0 ({share['decide_s']:.2f} s with the broadcast, of which "
                      f"{share['choose_s']:.2f} s refitting and choosing)")
        record["tasks"][name] = {"task": asdict(task), "runs": runs, "time_to_target_s": times,
                                 "time_to_target_per_round_s": per_round, "overhead": share,
                                 "best_fixed_s": best, "median_fixed_s": median,
                                 "adaptive_no_slower_than_best": ok_best, "adaptive_faster_than_median": ok_median}
    record["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                         "load_avg": os.getloadavg()}
    return record


def set_value(text: str) -> Any:
    """A ``--set`` value: JSON (numbers, true/false), else the text itself (mlp.precondition_form=pollux)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    """Parse arguments, plan, run the ranks, report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=Settings.nproc)
    p.add_argument("--tasks", default=",".join(Settings.tasks), help="comma-separated: " + ", ".join(TASKS))
    p.add_argument("--rounds", type=int, default=Settings.rounds)
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    p.add_argument("--set", action="append", default=[], metavar="TASK.FIELD=VALUE",
                   help="change a task field, e.g. mlp.target=1.3 (repeatable)")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()
    overrides: dict[str, dict[str, Any]] = {}
    for item in a.set:
        key, value = item.split("=", 1)
        task, fld = key.split(".", 1)
        overrides.setdefault(task, {})[fld] = tuple(json.loads(value)) if fld == "batches" else set_value(value)
    s = Settings(nproc=a.nproc, tasks=tuple(a.tasks.split(",")), runs=tuple(a.runs.split(",")), rounds=a.rounds,
                 overrides=overrides)
    torch.set_num_threads(1)
    for name in s.tasks:  # made once here, shared by the forked ranks
        task_parts(name)
    plans = {name: make_plans(s, _task(s, name)) for name in s.tasks}
    results = run_ranks(bench_rank, s.nproc, s, plans, timeout_s=7200)[0]
    record = report(s, results)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
