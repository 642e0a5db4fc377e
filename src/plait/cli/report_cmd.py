"""``plait report``: draw a run's metrics (loss, step time and, for adaptive runs, batch, noise scale,
efficiency, gain and goodput) over steps as PNGs in RUN_DIR/report/."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from plait.errors import PlaitError

REPORT_DIR = "report"
METRICS_FILE = "metrics.jsonl"  # plait.runtime.metrics.METRICS_FILE (not imported here: it pulls in torch)


@dataclass(frozen=True)
class Series:
    """One plot: a field of the metrics records against the step."""

    field: str  # key of the metrics record (StepMetrics attribute)
    file: str  # PNG name in the report folder
    title: str
    ylabel: str
    scale: float = 1.0  # multiply the values by this (seconds -> ms)
    log: bool = False  # log y axis when every value is positive
    adaptive: bool = False  # only present in adaptive runs


SERIES = (
    Series("loss", "loss.png", "training loss", "loss"),
    Series("step_s", "step_time.png", "step time", "ms per step", scale=1e3),
    Series("batch_size", "batch_size.png", "global batch", "samples per step", adaptive=True),
    Series("noise_scale", "noise_scale.png", "gradient noise scale (smoothed)", "noise scale (samples)", log=True,
           adaptive=True),
    Series("efficiency", "efficiency.png", "statistical efficiency against the initial batch", "efficiency",
           adaptive=True),
    Series("gain", "gain.png", "AdaScale gain (initial-batch steps per step)", "gain", adaptive=True),
    Series("goodput", "goodput.png", "goodput (measured throughput x efficiency)", "initial-batch samples / s",
           adaptive=True),
)


def load_steps(run_dir: Path) -> list[dict[str, Any]]:
    """The step records of ``run_dir``'s metrics file, as dicts; a PlaitError when there are none."""
    if not run_dir.is_dir():
        raise PlaitError(f"no run directory {str(run_dir)!r}; give the --out folder of a `plait run` or `plait demo`")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise PlaitError(f"{str(run_dir)!r} has no {METRICS_FILE}; give the --out folder of a run that trained "
                         "at least one step")
    from plait.runtime.metrics import read_metrics

    try:
        steps = read_metrics(path)
    except (json.JSONDecodeError, TypeError) as exc:
        raise PlaitError(f"{path} is not a plait metrics file ({exc}); was it written by `plait run`?") from exc
    if not steps:
        raise PlaitError(f"{path} records no steps yet; report a run after its first step")
    return [vars(m) for m in steps]


def _points(records: Sequence[dict[str, Any]], series: Series) -> tuple[list[int], list[float]]:
    """Steps and finite values of one field (steps where it is missing or not finite are left out)."""
    xs, ys = [], []
    for r in records:
        value = r.get(series.field)
        if value is None and series.field == "goodput" and r.get("efficiency") is not None:
            value = r["samples_per_s"] * r["efficiency"]  # a metrics file written before goodput was recorded
        if value is not None and math.isfinite(value):
            xs.append(int(r["step"]))
            ys.append(float(value) * series.scale)
    return xs, ys


def write_report(run_dir: str | Path) -> tuple[list[Path], list[str]]:
    """Write the PNGs of ``run_dir``'s metrics into ``run_dir/report/``; returns the paths and notes on
    plots left out (a field with no finite value)."""
    run = Path(run_dir)
    records = load_steps(run)
    adaptive = any(r.get("batch_size") is not None for r in records)
    out = run / REPORT_DIR
    out.mkdir(exist_ok=True)
    plt = _pyplot()
    written: list[Path] = []
    notes: list[str] = []
    for series in SERIES:
        if series.adaptive and not adaptive:
            continue
        xs, ys = _points(records, series)
        if not xs:
            notes.append(f"no {series.field.replace('_', ' ')} recorded: {series.file} not drawn")
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        ax.plot(xs, ys, marker="." if len(xs) <= 50 else None, lw=1.2)
        if series.log and min(ys) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(series.ylabel)
        ax.set_title(f"{series.title} ({run.resolve().name})")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / series.file
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written, notes


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(file_okay=True, dir_okay=True))
def report(run_dir: str) -> None:
    """Draw RUN_DIR's metrics.jsonl over steps as PNGs in RUN_DIR/report/: loss and step time, and for an
    adaptive run (`plait run --adaptive`, TrainConfig(adaptive=True)) the global batch, the gradient noise
    scale, the statistical efficiency and the AdaScale gain. Prints the paths written."""
    written, notes = write_report(run_dir)
    for note in notes:
        click.echo(f"plait report: {note}", err=True)
    for path in written:
        click.echo(str(path))
