"""Per-step metrics on rank 0: a console line, a rich progress bar and one JSON object per line in a file.

With adaptive training each record also holds the step's global batch, the gradient noise scale, the
statistical efficiency, the AdaScale gain, the learning-rate factor, the progress in scale-invariant
iterations and the goodput (measured samples per second times efficiency: initial-batch samples of progress per
second), and the progress bar shows the batch, the noise scale, the efficiency and the goodput. Without it the
records are as before.

Plans synchronised by ``plait.runtime.sync`` add the bytes rank 0 sent and received in the step, under the flat
keys of ``ModelSync.step_bytes()`` (``sync.sent_bytes``, ``sync.recv_bytes``, ``sync.<name>.sent_bytes``, ...).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from plait.adaptive import AdaptiveStats
from plait.fileio import atomic_write

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True, kw_only=True)
class StepMetrics:
    """What one optimizer step measured."""

    step: int  # optimizer steps done, counting this one
    loss: float  # averaged over every rank's share of the global batch
    step_s: float
    samples_per_s: float
    time: float  # wall clock (seconds since the epoch) at the end of the step
    # adaptive training only (None otherwise, and left out of the file)
    batch_size: int | None = None  # global batch of the step
    noise_scale: float | None = None  # smoothed gradient noise scale known at the step (a few steps behind)
    efficiency: float | None = None  # statistical efficiency of the batch against the initial one
    gain: float | None = None  # AdaScale gain: initial-batch steps the step is worth
    lr_factor: float | None = None  # factor the learning rate was multiplied by
    progress: float | None = None  # scale-invariant iterations done
    goodput: float | None = None  # measured samples/s x efficiency: initial-batch samples of progress per second
    # runtime.sync only: rank 0's bytes of the step, keyed as ModelSync.step_bytes() ("sync.sent_bytes", ...)
    sync_bytes: dict[str, int] | None = None

    def record(self) -> dict[str, float | int]:
        """The JSON object of the metrics file (adaptive fields only when set; byte counts as flat ``sync.*`` keys)."""
        out = {k: v for k, v in asdict(self).items() if v is not None and k != "sync_bytes"}
        return {**out, **(self.sync_bytes or {})}


def read_metrics(path: str | os.PathLike[str]) -> list[StepMetrics]:
    """Every step recorded in a metrics file."""
    lines = Path(path).read_text().splitlines()
    return [_from_record(json.loads(line)) for line in lines if line.strip()]


def _from_record(record: dict[str, float | int]) -> StepMetrics:
    """A metrics-file object back as StepMetrics (``sync.*`` keys into ``sync_bytes``)."""
    sync = {k: int(v) for k, v in record.items() if k.startswith("sync.")}
    rest = {k: v for k, v in record.items() if not k.startswith("sync.")}
    return StepMetrics(**rest, sync_bytes=sync or None)  # type: ignore[arg-type]


def describe_stats(stats: AdaptiveStats) -> str:
    """Batch, noise scale, efficiency and gain in a few words (console line, progress bar)."""
    return (f"batch {stats.batch_size}  noise scale {stats.noise_scale:.4g}  efficiency {stats.efficiency:.3f}  "
            f"gain {stats.gain:.3f}")


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the records of steps up to ``last_step`` (a resumed run redoes the later ones)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    atomic_write(path, "".join(line + "\n" for line in kept))


class MetricsLog:
    """Writes step metrics to the console and a JSONL file; inactive (silent) off rank 0."""

    def __init__(
        self,
        *,
        active: bool,
        total_steps: int,
        start_step: int = 0,
        out_dir: str | os.PathLike[str] | None = None,
        log_every: int = 1,
        progress: bool = True,
        title: str = "train",
        adaptive: bool = False,
    ) -> None:
        self.active = active
        self.log_every = max(1, log_every)
        self.total_steps = total_steps
        self.console = Console(file=sys.stdout, highlight=False)
        self.path = Path(out_dir) / METRICS_FILE if (active and out_dir is not None) else None
        self.file: TextIO | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            truncate_metrics(self.path, start_step)
            self.file = open(self.path, "a")  # noqa: SIM115 - open for the log's life, closed by close()
        self.progress: Progress | None = None
        if active and progress:
            stats = (TextColumn("{task.fields[stats]}"),) if adaptive else ()
            self.progress = Progress(
                TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
                *stats, TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False,
            )
            self.task = self.progress.add_task(title, total=total_steps, completed=start_step, loss="", stats="")

    def __enter__(self) -> MetricsLog:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.close()

    def close(self) -> None:
        """Close the metrics file (``with`` does it on the way out)."""
        if self.file is not None:
            self.file.close()
            self.file = None

    def due(self, step: int) -> bool:
        """Whether ``step`` is printed: every ``log_every`` steps and the last."""
        return step % self.log_every == 0 or step == self.total_steps

    def print(self, text: str) -> None:
        """A console line (rank 0 only), above the progress bar."""
        if self.active:
            self.console.print(text, markup=False)

    def log(self, step: int, loss: float, step_s: float, samples: int, stats: AdaptiveStats | None = None, *,
            sync_bytes: Mapping[str, int] | None = None) -> StepMetrics:
        """Record one step; prints it when ``due`` and always appends it to the JSONL file (flushed)."""
        extra: dict[str, float | None] = asdict(stats) if stats is not None else {}
        rate = samples / step_s if step_s > 0 else 0.0
        if stats is not None:
            extra["goodput"] = rate * stats.efficiency
        m = StepMetrics(step=step, loss=loss, step_s=step_s, samples_per_s=rate, time=time.time(),
                        sync_bytes=dict(sync_bytes) if sync_bytes is not None else None, **extra)  # type: ignore[arg-type]
        if not self.active:
            return m
        if self.file is not None:
            self.file.write(json.dumps(m.record()) + "\n")
            self.file.flush()
        described = f"{describe_stats(stats)}  goodput {m.goodput:.1f}" if stats is not None else ""
        if self.due(step):
            self.print(f"step {step}/{self.total_steps}  loss {loss:.4f}  {step_s * 1e3:.1f} ms  {m.samples_per_s:.1f} samples/s"
                       + (f"  {described}" if described else ""))
        if self.progress is not None:
            short = (f"batch {stats.batch_size}  noise scale {stats.noise_scale:.4g}  efficiency {stats.efficiency:.2f}  "
                     f"goodput {m.goodput:.1f}/s" if stats is not None else "")
            self.progress.update(self.task, completed=step, loss=f"loss {loss:.4f}", stats=short)
        return m
