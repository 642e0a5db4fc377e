"""Wait-free backprop is real: the first bucket's all-reduce starts while most of backward is still to run."""

from __future__ import annotations

import time

import torch
from runkit import zoo_plan

from plait.models import zoo_model
from plait.runtime import apply_plan, init_distributed, local_micro_batches, run_ranks, teardown

MiB = 1 << 20
STEPS = 4  # the first is a warm-up


def overlap_rank(plan) -> list[tuple[float, float, object]]:
    """Backward passes of gpt-mini on this rank: (time before backward, time after, the WFBP trace)."""
    ctx = init_distributed()
    zm = zoo_model("gpt-mini")
    torch.manual_seed(0)
    applied = apply_plan(zm.build(), plan, ctx)
    assert applied.replicate is not None
    optimizer = torch.optim.SGD(applied.model.parameters(), lr=0.0)
    rows = []
    for step in range(STEPS):
        batch = zm.make_batch(plan.batch.global_size, generator=torch.Generator().manual_seed(step))
        (mine,) = local_micro_batches(batch, plan.batch, dp_rank=applied.dp_rank)
        applied.zero_grad(optimizer)
        loss = zm.loss(applied.model, mine)
        t0 = time.perf_counter()
        loss.backward()
        t1 = time.perf_counter()
        rows.append((t0, t1, applied.replicate.traces[-1]))
    teardown()
    return rows


def test_first_bucket_all_reduce_starts_before_backward_ends() -> None:
    plan = zoo_plan("gpt-mini", "replicate", world=2, global_batch=8, micro_batch=4, bucket_bytes=MiB // 2)
    num_buckets = len(plan.buckets)
    assert num_buckets >= 3
    done_early = 0
    for rows in run_ranks(overlap_rank, 2, plan, timeout_s=120):
        for t0, t1, trace in rows[1:]:
            launches = trace.bucket_launch_s
            assert len(launches) == num_buckets
            assert list(launches) == sorted(launches)  # launched in bucket order
            assert t0 < trace.first_grad_s <= launches[0] < trace.backward_end_s <= trace.sync_end_s <= t1
            # the first all-reduce is on its way while more than half of the backward pass remains
            assert launches[0] - t0 < 0.5 * (trace.backward_end_s - t0)
            done_early += trace.bucket_done_s[0] < trace.backward_end_s
            print(f"backward {1e3 * (trace.backward_end_s - t0):.1f} ms, first launch at {1e3 * (launches[0] - t0):.1f} ms, "
                  f"first done at {1e3 * (trace.bucket_done_s[0] - t0):.1f} ms, all done {1e3 * (trace.sync_end_s - t0):.1f} ms")
    assert done_early >= 1  # and, in at least one step, it even finished before backward did
