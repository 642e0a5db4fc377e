"""A training script for the launcher tests: a zoo model through plait's Trainer, with injectable faults.

Run it with ``plait run train_zoo.py --nproc N --plan PLAN.json [--out DIR] [--resume] -- [options]``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from plait.models import zoo_model
from plait.plan import load_plan
from plait.runtime import TrainConfig, Trainer, init_distributed, teardown


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gpt-tiny")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to wait in each step's data loading")
    p.add_argument("--fail-rank", type=int, default=-1)
    p.add_argument("--fail-step", type=int, default=-1)
    p.add_argument("--fixed-data", action="store_true", help="the same batch every step (the loss must fall)")
    p.add_argument("--pid-dir", default=None)
    return p.parse_args()


def main() -> None:
    args = parse()
    ctx = init_distributed()
    print(f"rank {ctx.rank}/{ctx.world_size} on {ctx.device} ({ctx.backend}), pid {os.getpid()}")
    if args.pid_dir:
        Path(args.pid_dir, f"rank{ctx.rank}.pid").write_text(str(os.getpid()))
    zm = zoo_model(args.model)
    plan = load_plan(os.environ["PLAIT_PLAN"])

    def data(step: int) -> tuple[torch.Tensor, ...]:
        time.sleep(args.sleep)
        if step == args.fail_step and ctx.rank == args.fail_rank:
            raise ValueError(f"bad batch at step {step} on rank {ctx.rank}")
        seed = 1000 if args.fixed_data else 1000 + step
        return zm.make_batch(plan.batch.global_size, generator=torch.Generator().manual_seed(seed))

    config = TrainConfig.from_env(steps=args.steps, lr=args.lr, checkpoint_every=args.ckpt_every, title=args.model)
    result = Trainer(model_fn=zm.build, loss_fn=zm.loss, data=data, plan=plan, config=config, ctx=ctx).fit()
    if ctx.is_main:
        print(f"done: {len(result.losses)} steps from step {result.start_step}, last loss {result.losses[-1]:.4f}")
    teardown()


if __name__ == "__main__":
    main()
