"""One rank of the demo: ``python -m plait.demo.worker JOB_JSON`` under ``plait``'s launcher."""

from __future__ import annotations

import os
import sys

from plait.demo.job import DemoJob, lm_loss
from plait.plan.io import load_plan
from plait.runtime.envvars import PLAN_ENV
from plait.runtime.trainer import TrainConfig, Trainer


def main(argv: list[str]) -> None:
    """Train the demo job with the plan the launcher passed in the environment."""
    job = DemoJob.from_json(argv[0])
    plan = load_plan(os.environ[PLAN_ENV])
    config = TrainConfig.from_env(steps=job.steps, lr=job.lr, weight_decay=job.weight_decay, seed=job.seed,
                                  title=f"demo on {plan.world_size} ranks")
    Trainer(model_fn=job.build_model, loss_fn=lm_loss, data=job.data(), plan=plan, config=config).fit()


if __name__ == "__main__":
    main(sys.argv[1:])
