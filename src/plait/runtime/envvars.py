"""Environment variables that `plait run` sets for every rank (no torch import, so the launcher stays light)."""

from __future__ import annotations

import os

# torchrun's variables, set for every rank.
RANK_KEYS = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
)
# plait's, for the training script: the plan file, whether to resume, the output folder.
PLAN_ENV, RESUME_ENV, OUT_ENV = "PLAIT_PLAN", "PLAIT_RESUME", "PLAIT_OUT"
# Seconds a rendezvous or collective may wait before it raises (`plait run --dist-timeout`).
DIST_TIMEOUT_ENV = "PLAIT_DIST_TIMEOUT_S"


def env_flag(key: str) -> bool:
    """True when an environment variable is set to 1/true/yes."""
    return os.environ.get(key, "").strip().lower() in ("1", "true", "yes")
