"""One rank of the demo: ``python -m plait.demo.worker JOB_JSON`` under ``plait``'s launcher."""

from __future__ import annotations

import os
import sys
from typing import Any

from plait.demo.job import DemoJob, lm_loss
from plait.plan.io import load_plan
from plait.runtime.envvars import PLAN_ENV
from plait.runtime.trainer import TrainConfig, Trainer


def main(argv: list[str]) -> None:
    """Train the demo job with the plan the launcher passed in the environment."""
    job = DemoJob.from_json(argv[0])
    plan = load_plan(os.environ[PLAN_ENV])
    adaptive: dict[str, Any] = {}
    if job.adaptive:  # the batch follows the goodput optimizer: AdamW's learning rate by sqrt(gain) (adamscale)
        adaptive = {"adaptive": True, "adapt_batch_every": job.adapt_batch_every, "max_batch_size": 16 * job.global_batch,
                    "lr_scaling": "adamscale"}
    config = TrainConfig.from_env(steps=job.steps, lr=job.lr, weight_decay=job.weight_decay, seed=job.seed,
                                  title=f"demo on {plan.world_size} ranks", **adaptive)
    data = job.samples() if job.adaptive else job.data()
    Trainer(model_fn=job.build_model, loss_fn=lm_loss, data=data, plan=plan, config=config).fit()


if __name__ == "__main__":
    main(sys.argv[1:])
