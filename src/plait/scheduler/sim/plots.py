"""PNG plots of simulation results (matplotlib, Agg backend): JCT CDF and GPU-utilisation timeline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from plait.scheduler.decisions import ClusterView
from plait.scheduler.sim.metrics import ScheduleResult


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_jct_cdf(results: Sequence[ScheduleResult], path: Path) -> None:
    """Empirical CDF of job completion times (hours, log scale), one line per policy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r in results:
        jct = np.sort([j.jct / 3600 for j in r.jobs])
        ax.step(jct, np.arange(1, len(jct) + 1) / len(jct), where="post",
                label=f"{r.policy} (avg {r.avg_jct / 3600:.2f} h)")
    ax.set_xscale("log")
    ax.set_xlabel("job completion time (h)")
    ax.set_ylabel("fraction of jobs")
    ax.set_title(f"JCT CDF: {results[0].workload}, {results[0].cluster}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_utilization(results: Sequence[ScheduleResult], path: Path) -> None:
    """Allocated GPUs over time, and the number of active jobs, one panel row per policy."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(results), 1, figsize=(7.0, 2.2 * len(results) + 0.6), squeeze=False,
                             sharex=True)
    for ax, r in zip(axes[:, 0], results, strict=True):
        t = np.array([p.time / 3600 for p in r.timeline])
        total = ClusterView.parse(r.cluster).total_gpus
        ax.fill_between(t, [p.used_gpus for p in r.timeline], step="post", alpha=0.5, label="GPUs allocated")
        ax.step(t, [p.active_jobs for p in r.timeline], where="post", color="k", lw=0.8, label="active jobs")
        ax.axhline(total, color="r", lw=0.8, ls="--")
        ax.set_ylabel(r.policy)
        ax.set_title(f"{r.policy}: utilisation {r.gpu_utilization:.0%}", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("time (h)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
