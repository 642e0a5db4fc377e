"""What every policy shares: how jobs are configured under it, and the registry of policies by name."""

from __future__ import annotations

import enum


class JobMode(enum.Enum):
    """How jobs run under a policy (the paper's baselines use 'TunedJobs': fixed GPUs and batch)."""

    ADAPTIVE = "adaptive"  # GPUs from the policy; batch size and accumulation chosen by the job (Pollux)
    FIXED_BATCH = "fixed-batch"  # GPUs from the policy; the job's tuned total batch (Optimus)
    RIGID = "rigid"  # exactly the job's tuned GPU count and batch, or nothing (Tiresias, FIFO)
