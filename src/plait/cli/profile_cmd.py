"""``plait profile``: measure this machine and write the profile the cost model reads."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from plait.cluster import default_profile_path
from plait.cost.profile import Profile, save_profile

DEFAULT_CPU_RANKS = 4


@click.command()
@click.option("--nproc", type=int, default=None, help=f"Ranks to measure with (default: {DEFAULT_CPU_RANKS} on CPU, every GPU on CUDA).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Profile file to write (default: the file `local:N` reads).")
@click.option("--quick", is_flag=True, help="Fewer sizes and repeats: well under a minute on a small machine.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="What to measure.")
def profile(nproc: int | None, out: Path | None, quick: bool, device: str) -> None:
    """Measure matmul rates, kernel overhead, memory bandwidth and collectives among N local ranks."""
    from plait.profiling import default_config, measure_profile

    console = Console()
    ranks = nproc if nproc is not None else _default_ranks(device)
    cfg = default_config(device=device, nproc=ranks, quick=quick)  # type: ignore[arg-type]
    target = out or default_profile_path()
    console.print(f"profiling {device} with {ranks} rank(s){' (quick)' if quick else ''}; writing {target}")
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("measuring", total=cfg.num_steps)
        result = measure_profile(cfg, progress=lambda done: bar.update(task, completed=done))
    save_profile(result, target)
    console.print(summary_table(result))
    console.print(f"wrote {target}")


def _default_ranks(device: str) -> int:
    if device == "cuda":
        import torch

        return max(1, torch.cuda.device_count())
    return DEFAULT_CPU_RANKS


def summary_table(result: Profile) -> Table:
    """The headline numbers of a profile, one row per number of ranks computing at once."""
    table = Table(title=f"{result.device.name} ({result.device.kind})")
    for column in ("ranks busy", "best GEMM GFLOP/s", "kernel us", "tiny op us", "copy GB/s", "elementwise GB/s"):
        table.add_column(column, justify="right")
    for rates in result.rates:
        best: dict[str, float] = {}
        for p in result.matmul:
            if p.concurrent == rates.concurrent:
                best[p.dtype] = max(best.get(p.dtype, 0.0), p.rate)
        table.add_row(
            str(rates.concurrent),
            ", ".join(f"{dtype} {rate / 1e9:.0f}" for dtype, rate in best.items()),
            f"{rates.kernel_s * 1e6:.1f}",
            f"{rates.op_s * 1e6:.2f}",
            f"{rates.copy_bandwidth / 1e9:.1f}",
            f"{rates.elementwise_bandwidth / 1e9:.1f}",
        )
    if result.collectives:
        top = max(c.nbytes for c in result.collectives)
        largest = [c for c in result.collectives if c.op == "all_reduce" and c.nbytes == top]
        for c in largest:
            table.caption = (table.caption or "") + f"all_reduce {c.nbytes / 2**20:.1f} MiB on {c.group_size}: {c.seconds * 1e3:.2f} ms  "
    return table
