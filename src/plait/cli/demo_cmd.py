"""``plait demo``: the main job on the embedded default (a small GPT, this machine as the cluster)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.table import Table

from plait.cluster import Cluster
from plait.cost import CostModel
from plait.demo.job import DemoJob
from plait.errors import LaunchError, PlaitError
from plait.plan import Plan
from plait.plan.table import console_for_tables

TOLERANCE = 1e-3


@click.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="runs/demo", show_default=True, help="Where plan, metrics, checkpoints and PNGs go.")
@click.option("--steps", type=click.IntRange(1), default=100, show_default=True, help="Optimizer steps to train.")
@click.option("--nproc", type=click.IntRange(1, 16), default=4, show_default=True, help="Local ranks (the cluster is local:NPROC).")
@click.option("--no-reference", is_flag=True, help="Skip the single-process reference run.")
@click.option("--no-profile", is_flag=True, help="Do not measure this machine first when it has no profile yet.")
@click.option("--adaptive", is_flag=True,
              help="Adaptive batch: the Trainer chooses the batch that maximises goodput every 10 steps (no reference run).")
def demo(out_dir: str, steps: int, nproc: int, no_reference: bool, no_profile: bool, adaptive: bool) -> None:
    """Plan, train and check a small GPT on NPROC local processes.

    Captures a small GPT, plans it for local:NPROC with a global batch of 8 per rank and prints the
    plan, trains it on NPROC real processes, trains the same job in one process as a reference, then
    prints predicted vs measured step time and writes the loss curve and the plan's timeline as PNG files.
    With --adaptive the batch follows the goodput optimizer (noise scale and measured throughput) from a stream of
    the corpus's samples, and the demo shows how it changed instead of comparing with a fixed-batch reference.
    """
    from plait.cluster import default_profile_path, load_cluster

    console = console_for_tables(120)
    out = _prepared_out(Path(out_dir))
    job = DemoJob.for_ranks(nproc, steps=steps)
    if adaptive:
        job = replace(job, adaptive=True)
    t_start = time.perf_counter()
    if not no_profile and not default_profile_path().is_file():
        _quick_profile(console, nproc)
    cluster = load_cluster(f"local:{nproc}")
    plan = _plan(console, job, cluster, out)
    plait_losses, plait_times = _train(console, job, out)
    _compare(console, job, out, plan, plait_losses, plait_times, no_reference or adaptive)
    if adaptive:
        _adaptive_summary(console, out)
    console.print(f"demo finished in {time.perf_counter() - t_start:.0f} s; outputs in {out}/")


def _adaptive_summary(console: Console, out: Path) -> None:
    """How the batch changed over the run, with the noise scale, efficiency and goodput when it did."""
    from plait.runtime.metrics import METRICS_FILE, read_metrics

    records = read_metrics(out / METRICS_FILE)
    table = Table(title="plait demo --adaptive: the batch over the run")
    for col in ("steps", "global batch", "noise scale", "efficiency", "goodput (M0 samples/s)"):
        table.add_column(col, justify="right")
    start = 0
    for i, r in enumerate(records):
        if i + 1 == len(records) or records[i + 1].batch_size != r.batch_size:
            span = records[start : i + 1]
            table.add_row(f"{span[0].step}-{r.step}", str(r.batch_size), f"{r.noise_scale or 0:.4g}",
                          f"{r.efficiency or 0:.3f}", f"{sum(x.goodput or 0 for x in span) / len(span):.1f}")
            start = i + 1
    console.print(table)
    console.print(f"draw batch, noise scale, efficiency and goodput over the steps: plait report {out}")


def _prepared_out(out: Path) -> Path:
    """Create the output folder and make sure it takes files, before minutes of profiling and training."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise PlaitError(f"cannot write to the output folder {out} ({exc.strerror or exc}); choose another with --out") from None
    return out


def _quick_profile(console: Console, nproc: int) -> None:
    from plait.cli.profile_cmd import profile as profile_cmd

    console.rule("measuring this machine (first run only): plait profile --quick")
    profile_cmd.main(args=["--quick", "--nproc", str(nproc)], standalone_mode=False)


def _plan(console: Console, job: DemoJob, cluster: Cluster, out: Path) -> Plan:
    from plait.demo.job import lm_loss
    from plait.plan import plan_table, save_plan
    from plait.planners import plan as make_plan
    from plait.sim import draw_timeline, simulate

    console.rule(f"planning a {job.num_layers}-layer GPT for {cluster.name}")
    with torch.device("meta"):
        model = job.build_model()
    cost = CostModel(cluster)
    plan = make_plan(model, job.example_batch(job.global_batch // job.nproc), cluster, global_batch=job.global_batch,
                     loss_fn=lm_loss, name="demo-gpt", cost=cost)
    save_plan(plan, out / "plan.json")
    console.print(plan_table(plan))
    # plan() keeps the winner's prediction, not its simulation: simulating it again (cheap) gives the timeline
    draw_timeline(simulate(plan, cost), str(out / "timeline.png"), title=f"predicted timeline: demo-gpt on {cluster.name}")
    return plan


def _train(console: Console, job: DemoJob, out: Path) -> tuple[list[float], list[float]]:
    from plait.runtime.launch import launch
    from plait.runtime.metrics import METRICS_FILE, read_metrics

    console.rule(f"training on {job.nproc} local ranks (gloo, one thread each)")
    metrics = out / METRICS_FILE
    metrics.unlink(missing_ok=True)
    result = launch("plait.demo.worker", module=True, nproc=job.nproc, script_args=[job.to_json()], plan=out / "plan.json",
                    out_dir=out)
    if not result.ok:
        raise LaunchError(f"demo training failed: {result.message}")
    records = read_metrics(metrics)
    return [r.loss for r in records], [r.step_s for r in records]


def _compare(console: Console, job: DemoJob, out: Path, plan: Plan, losses: list[float], times: list[float], no_reference: bool) -> None:
    from plait.demo.report import StepTimes, measured_step_time

    step = StepTimes(predicted_s=plan.predicted.step_s if plan.predicted else float("nan"), measured_s=measured_step_time(times))
    table = Table(title="plait demo: results")
    table.add_column("check")
    table.add_column("value", justify="right")
    table.add_row("predicted step time", f"{step.predicted_s * 1e3:.1f} ms")
    table.add_row("measured step time (median)", f"{step.measured_s * 1e3:.1f} ms")
    table.add_row("prediction error", f"{step.error:.0%}")
    table.add_row("plait final loss", f"{losses[-1]:.4f}")
    if no_reference:
        console.print(table)
        return
    _check_reference(console, job, out, losses, table)


def _check_reference(console: Console, job: DemoJob, out: Path, losses: list[float], table: Table) -> None:
    from plait.demo.reference import train_reference
    from plait.demo.report import Comparison, draw_losses, max_param_diff
    from plait.runtime.trainer import FINAL_FILE

    console.rule("single-process reference (plain PyTorch, same global batch)")
    with console.status("training the reference"):
        ref_losses, ref_state, ref_step = train_reference(job)
    final = torch.load(out / FINAL_FILE, weights_only=True)
    cmp = Comparison(
        max_loss_diff=max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
        max_param_diff=max_param_diff(final, ref_state),
        final_loss=losses[-1],
        reference_final_loss=ref_losses[-1],
        reference_step_s=ref_step,
    )
    draw_losses(losses, ref_losses, out / "loss.png", nproc=job.nproc)
    table.add_row("reference final loss", f"{cmp.reference_final_loss:.4f}")
    table.add_row("max |loss - reference| over steps", f"{cmp.max_loss_diff:.2e}")
    table.add_row("max |param - reference|", f"{cmp.max_param_diff:.2e}")
    table.add_row("reference step time (1 process)", f"{ref_step * 1e3:.1f} ms")
    table.add_row("matches reference", "yes" if cmp.matches(TOLERANCE) else "NO")
    table.add_row("pictures", f"{out / 'loss.png'}, {out / 'timeline.png'}")
    console.print(table)
    if not cmp.matches(TOLERANCE):
        raise PlaitError(f"plait's run differs from the single-process reference by more than {TOLERANCE} (see the table)")
    console.print(f"check passed: plait on {job.nproc} ranks matches the single-process reference "
                  f"(losses within {cmp.max_loss_diff:.1e}, parameters within {cmp.max_param_diff:.1e})")
