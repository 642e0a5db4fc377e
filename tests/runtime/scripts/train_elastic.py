"""A training script for the elastic tests: a zoo model on a dataset of indexed samples (a SampleStream).

Run it with ``plait run --elastic train_elastic.py --plan PLAN.json --out DIR -- [options]``. Every rank records, per
step, the sample indices of the rows it trained on (``DIR/seen/<world>-<rank>-<pid>.txt``, lines ``step i j ...``),
and the losses. ``--hold S`` (repeatable) stops the ranks in step S until ``DIR/go-S`` exists (rank 0 first writes
``DIR/at-S``), so a test can ask for a resize at a known step boundary whatever the machine's speed.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from plait.data.samples import SampleStream, TensorSamples
from plait.models import zoo_model
from plait.plan import load_plan
from plait.runtime import TrainConfig, Trainer, init_distributed, teardown


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mlp-tiny")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--samples", type=int, default=48, help="samples in the dataset (one epoch)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--hold", type=int, action="append", default=[], help="wait in this step until OUT/go-STEP exists")
    return p.parse_args()


def main() -> None:
    args = parse()
    ctx = init_distributed()
    out = Path(os.environ["PLAIT_OUT"])
    zm = zoo_model(args.model)
    plan = load_plan(os.environ["PLAIT_PLAN"])
    data = zm.make_batch(args.samples, generator=torch.Generator().manual_seed(1234))
    stream = SampleStream(TensorSamples(*data, torch.arange(args.samples)), seed=7)
    seen_dir = out / "seen"
    seen_dir.mkdir(parents=True, exist_ok=True)
    record = open(seen_dir / f"{ctx.world_size}-{ctx.rank}-{os.getpid()}.txt", "a")  # noqa: SIM115
    pending: list[int] = []

    def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        pending.extend(int(i) for i in batch[-1])
        return zm.loss(model, batch[:-1])

    def before_step(step: int, model: torch.nn.Module) -> None:
        record.write(f"{step} {' '.join(map(str, pending))}\n")
        record.flush()
        pending.clear()
        if step in args.hold:
            if ctx.is_main:
                (out / f"at-{step}").write_text("")
            while not (out / f"go-{step}").exists():
                time.sleep(0.05)

    config = TrainConfig.from_env(steps=args.steps, lr=args.lr, title=args.model, progress=False)
    result = Trainer(model_fn=zm.build, loss_fn=loss_fn, data=stream, plan=plan, config=config, ctx=ctx,
                     before_step=before_step).fit()
    if ctx.is_main:
        print(f"done: {len(result.losses)} steps from step {result.start_step} on {ctx.world_size} ranks")
    teardown()


if __name__ == "__main__":
    main()
