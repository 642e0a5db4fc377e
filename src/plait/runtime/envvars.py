"""Environment variables that `plait run` sets for every rank (no torch import, so the launcher stays light)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from plait.errors import PlaitError

# torchrun's variables, set for every rank.
RANK_KEYS = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
)
# plait's, for the training script: the plan file, whether to resume, the output folder.
PLAN_ENV, RESUME_ENV, OUT_ENV = "PLAIT_PLAN", "PLAIT_RESUME", "PLAIT_OUT"
# Seconds a rendezvous or collective may wait before it raises (`plait run --dist-timeout`).
DIST_TIMEOUT_ENV = "PLAIT_DIST_TIMEOUT_S"
# Adaptive training (`plait run --adaptive [--lr-scaling R] [--init-batch-size N]`), read by TrainConfig.from_env.
ADAPTIVE_ENV, LR_SCALING_ENV, INIT_BATCH_ENV = "PLAIT_ADAPTIVE", "PLAIT_LR_SCALING", "PLAIT_INIT_BATCH_SIZE"
# Elastic runs (`plait run --elastic`): the folder where each rank says it listens for resize requests.
ELASTIC_ENV = "PLAIT_ELASTIC_DIR"


def env_flag(key: str) -> bool:
    """True when an environment variable is set to 1/true/yes."""
    return os.environ.get(key, "").strip().lower() in ("1", "true", "yes")


def adaptive_config_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """TrainConfig keyword arguments for what `plait run --adaptive [--lr-scaling R] [--init-batch-size N]` set
    ({} when off); ``TrainConfig.from_env`` applies them."""
    env = os.environ if environ is None else environ
    if env.get(ADAPTIVE_ENV, "").strip().lower() not in ("1", "true", "yes"):
        return {}
    kwargs: dict[str, Any] = {"adaptive": True}
    if env.get(LR_SCALING_ENV):
        kwargs["lr_scaling"] = env[LR_SCALING_ENV]
    if env.get(INIT_BATCH_ENV):
        try:
            kwargs["init_batch_size"] = int(env[INIT_BATCH_ENV])
        except ValueError:
            raise PlaitError(f"{INIT_BATCH_ENV}={env[INIT_BATCH_ENV]!r} is not a whole number of samples") from None
    return kwargs
