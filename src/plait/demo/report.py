"""The demo's checks and pictures: plait vs the single-process reference, predicted vs measured."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

WARMUP_STEPS = 5  # first steps pay for allocation and rendezvous; the measured step time skips them


@dataclass(frozen=True, kw_only=True)
class StepTimes:
    """plait's predicted step time against the one its run measured."""

    predicted_s: float
    measured_s: float

    @property
    def error(self) -> float:
        """Relative error of the predicted step time."""
        return abs(self.predicted_s - self.measured_s) / self.measured_s


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """How plait's run compares with the single-process reference."""

    max_loss_diff: float
    max_param_diff: float
    final_loss: float
    reference_final_loss: float
    reference_step_s: float

    def matches(self, tolerance: float) -> bool:
        """Whether losses and parameters agree with the reference within ``tolerance`` (relative to the loss)."""
        return self.max_loss_diff <= tolerance * max(1.0, abs(self.reference_final_loss)) and self.max_param_diff <= tolerance


def measured_step_time(step_times: list[float]) -> float:
    """Median step time after the warm-up steps."""
    timed = step_times[WARMUP_STEPS:] or step_times
    return statistics.median(timed)


def max_param_diff(final: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference over every parameter of the two state dicts."""
    missing = set(reference) ^ set(final)
    if missing:
        raise ValueError(f"state dicts differ in keys: {sorted(missing)[:5]}")
    return max(float((final[k].float() - reference[k].float()).abs().max()) for k in reference)


def draw_losses(plait_losses: list[float], reference_losses: list[float], path: Path, *, nproc: int) -> Path:
    """Loss curves of plait's run and the single-process reference in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = range(1, len(reference_losses) + 1)
    ax.plot(steps, reference_losses, label="single process (reference)", linewidth=3, alpha=0.5)
    ax.plot(range(1, len(plait_losses) + 1), plait_losses, label=f"plait on {nproc} ranks", linestyle="--")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("plait demo: data-parallel GPT vs single-process reference")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
