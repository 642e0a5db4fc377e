"""``plait sched``: trace-driven simulation of cluster scheduling policies."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from plait.errors import PlaitError
from plait.scheduler.decisions import ClusterView, Policy, SchedulerError
from plait.scheduler.policies import POLICY_NAMES, make_policy
from plait.scheduler.sim.metrics import ScheduleResult, write_results_json
from plait.scheduler.sim.simulator import simulate_schedule
from plait.scheduler.sim.workload import workload_path

COMPARE_DEFAULT = ("pollux", "optimus", "tiresias", "fifo")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def sched() -> None:
    """Cluster scheduling: simulate Pollux, Optimus, Tiresias and FIFO on job traces."""


@sched.command("sim")
@click.option("--workload", "workload", required=True, metavar="FILE",
              help="Workload CSV (name,time,application,num_replicas,batch_size) or a packaged name (1..8).")
@click.option("--policy", "policies", default="pollux", show_default=True, metavar="NAME[,NAME...]",
              help=f"Policy: {', '.join(POLICY_NAMES)}; several (comma-separated) with --compare.")
@click.option("--cluster", "cluster_text", default="16x4", show_default=True, metavar="NODESxGPUS",
              help="Nodes x GPUs per node.")
@click.option("--interval", default=60, show_default=True, type=int, help="Scheduling interval in seconds.")
@click.option("--compare", is_flag=True, help="Run several policies on the workload and print them side by side "
              "(the --policy list, or all four when one is given).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write per-job JCTs, average JCT, makespan and utilisation as JSON.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Folder for the JCT CDF and utilisation timeline PNGs.")
@click.option("--no-plots", is_flag=True, help="Do not write the PNG plots.")
@click.option("--per-job", "show_jobs", is_flag=True, help="Also print one row per job.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of Pollux's genetic algorithm.")
def sim(workload: str, policies: str, cluster_text: str, interval: int, compare: bool, json_path: Path | None,
        out_dir: Path, no_plots: bool, show_jobs: bool, seed: int) -> None:
    """Simulate scheduling POLICY on a workload trace and report job completion times."""
    names = [p.strip().lower() for p in policies.split(",") if p.strip()]
    if compare and len(names) < 2:
        names = list(COMPARE_DEFAULT)
    if not compare and len(names) != 1:
        raise SchedulerError(f"--policy {policies!r} names {len(names)} policies; add --compare to run several")
    chosen = [make_policy(n, seed=seed) for n in names]
    cluster = ClusterView.parse(cluster_text)
    label = workload_path(workload).stem
    plots = [] if no_plots else _plot_paths(out_dir, label)
    outputs = ([(json_path, "--json")] if json_path else []) + [(p, "--out") for p in plots]
    for path, flag in outputs:
        _check_writable(path, flag)
    results = [_run(workload, p, cluster, interval, label) for p in chosen]
    _print_results(results, compare, show_jobs)
    if json_path is not None:
        write_results_json(results, json_path)
        Console().print(f"wrote {json_path}")
    if plots:
        _write_plots(results, plots)


def _check_writable(path: Path, flag: str) -> None:
    """Create the folder of output file ``path`` and check that the file can be written."""
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a"):
            pass
    except OSError as exc:
        raise PlaitError(f"cannot write {flag} output {path}: {exc.strerror or exc}; "
                         "choose a path in a writable folder") from exc
    if not existed:
        path.unlink()


def _run(workload: str, policy: Policy, cluster: ClusterView, interval: int, label: str) -> ScheduleResult:
    err = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("jobs"),
                  TextColumn("t={task.fields[sim_h]:.1f} h"), TimeElapsedColumn(), console=err, transient=True,
                  disable=not err.is_terminal) as bar:
        task = bar.add_task(f"{policy.name} on {label}", total=None, sim_h=0.0)

        def progress(now: float, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, sim_h=now / 3600)

        return simulate_schedule(workload, policy, cluster=cluster, interval=interval, progress=progress)


def _print_results(results: Sequence[ScheduleResult], compare: bool, show_jobs: bool) -> None:
    console = Console()
    if compare:
        console.print(_compare_table(results))
    else:
        console.print(_summary_table(results[0]))
        console.print(_app_table(results[0]))
    if show_jobs:
        for r in results:
            console.print(_jobs_table(r))


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.3f}"


def _summary_table(r: ScheduleResult) -> Table:
    t = Table(title=f"{r.policy} on {r.workload} ({r.cluster}, {r.interval} s rounds, {len(r.jobs)} jobs)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [("average JCT (h)", _hours(r.avg_jct)), ("median JCT (h)", _hours(r.median_jct)),
            ("p99 JCT (h)", _hours(r.p99_jct)), ("makespan (h)", _hours(r.makespan)),
            ("GPU utilisation", f"{r.gpu_utilization:.1%}"), ("max finish-time fairness", f"{r.ftf_max:.2f}"),
            ("jobs with fairness < 2", f"{r.ftf_frac_below_2:.1%}"), ("restarts", str(r.total_restarts)),
            ("simulated rounds", str(r.rounds)), ("wall time (s)", f"{r.wall_time_s:.1f}")]
    for k, v in rows:
        t.add_row(k, v)
    return t


def _app_table(r: ScheduleResult) -> Table:
    t = Table(title="JCT by application")
    for col in ("application", "jobs", "avg JCT (h)", "max JCT (h)", "restarts"):
        t.add_column(col, justify="left" if col == "application" else "right")
    for app in sorted({j.application for j in r.jobs}):
        js = [j for j in r.jobs if j.application == app]
        t.add_row(app, str(len(js)), _hours(sum(j.jct for j in js) / len(js)), _hours(max(j.jct for j in js)),
                  str(sum(j.num_restarts for j in js)))
    return t


def _compare_table(results: Sequence[ScheduleResult]) -> Table:
    first = results[0]
    t = Table(title=f"{first.workload} on {first.cluster}, {first.interval} s rounds")
    t.add_column("metric")
    for r in results:
        t.add_column(r.policy, justify="right")
    metrics = [("average JCT (h)", lambda r: _hours(r.avg_jct)), ("p99 JCT (h)", lambda r: _hours(r.p99_jct)),
               ("makespan (h)", lambda r: _hours(r.makespan)),
               ("GPU utilisation", lambda r: f"{r.gpu_utilization:.1%}"),
               ("max finish-time fairness", lambda r: f"{r.ftf_max:.2f}"),
               ("restarts", lambda r: str(r.total_restarts)), ("wall time (s)", lambda r: f"{r.wall_time_s:.1f}")]
    for name, fn in metrics:
        t.add_row(name, *[fn(r) for r in results])
    best = min(r.avg_jct for r in results)
    t.add_row("avg JCT vs best", *[f"{r.avg_jct / best:.2f}x" for r in results])
    return t


def _jobs_table(r: ScheduleResult) -> Table:
    t = Table(title=f"{r.policy}: jobs")
    for col in ("job", "application", "submitted (s)", "JCT (s)", "restarts", "fairness"):
        t.add_column(col, justify="left" if col in ("job", "application") else "right")
    for j in r.jobs:
        t.add_row(j.name, j.application, f"{j.submission_time:.0f}", f"{j.jct:.0f}", str(j.num_restarts),
                  f"{j.ftf:.2f}")
    return t


def _plot_paths(out_dir: Path, label: str) -> list[Path]:
    """The JCT CDF and utilisation PNGs that ``--out`` receives."""
    return [out_dir / f"sched-{label}-jct-cdf.png", out_dir / f"sched-{label}-utilization.png"]


def _write_plots(results: Sequence[ScheduleResult], paths: Sequence[Path]) -> None:
    from plait.scheduler.sim.plots import plot_jct_cdf, plot_utilization

    cdf, util = paths
    plot_jct_cdf(results, cdf)
    plot_utilization(results, util)
    for path in paths:
        Console().print(f"wrote {path}")
