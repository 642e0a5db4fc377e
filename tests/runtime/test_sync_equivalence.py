"""Synchronous synchronizers on 4 gloo ranks equal one process, and move exactly the bytes the formulas say.

One launch of 4 forked ranks trains the tiny MLP (16 -> 32 -> 32 -> 8, K = 4 rows per worker) for 5 AdamW steps
under six per-parameter strategies: ring all-reduce, two parameter-server layouts with staleness 0, SFB, and
a per-layer mix of PS, SFB and all-reduce (also with 2 micro-batches per step). Each must match the single-process run over the global batch of 16
rows (losses and final parameters), and each rank's measured bytes per step must equal:

- ring all-reduce of B bytes over n ranks: sent = received = 2(n-1)/n * B per bucket;
- parameter server (co-located): rank r sends its gradient shards served elsewhere and answers every other
  worker for each shard it serves: sent = received = sum_{shards not on r} b + (n-1) * sum_{shards on r} b;
  Poseidon's accounting (a worker moves 2MN, a server 2*P1*M*N/P2) counts the traffic a rank has with its own
  shards too: a pure worker's sent + received is exactly 2MN, a server rank's is 2MN + 2*P1*MN/P2 - 4*MN/P2;
- SFB: every worker sends its K x (M + N) factors to each of the P1 - 1 others and receives theirs:
  sent + received = 2K(P1-1)(M+N) per layer (bias rebuilt from dY at no extra cost).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_sync_kit import GLOBAL_BATCH, WORLD, param_shapes, reference, run_scenarios, specs_all

from plait.plan.ir import SyncSpec
from plait.runtime import run_ranks
from plait.runtime.sync import AllReduceSync, ModelSync

STEPS = 5
F32 = 4  # bytes per number
K = GLOBAL_BATCH // WORLD
RTOL, ATOL = 1e-5, 1e-6  # losses (measured: <= 1.1e-7 relative)
PARAM_ATOL = 1e-6  # parameters after 5 AdamW steps, sums in another order than one process (measured: <= 8.2e-8)


def adamw(params: Any) -> torch.optim.Optimizer:
    """The optimizer of every run (servers build theirs over their shards with the same settings)."""
    return torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)


def ps(**fields: Any) -> SyncSpec:
    return SyncSpec(kind="ps", axes=("dp",), **fields)


def allreduce(bucket: int) -> SyncSpec:
    return SyncSpec(kind="allreduce", axes=("dp",), bucket=bucket)


SCENARIOS: dict[str, dict[str, SyncSpec]] = {
    # buckets in backward order: the last layer's gradients are ready first
    "allreduce": {"fc3.weight": allreduce(0), "fc3.bias": allreduce(0), "fc2.weight": allreduce(1),
                  "fc2.bias": allreduce(1), "fc1.weight": allreduce(2), "fc1.bias": allreduce(2)},
    # explicit, uneven (8 rows in 3 shards) and round-robin placements
    "ps": {"fc1.weight": ps(num_shards=2, servers=(0, 1)), "fc1.bias": ps(servers=(2,)),
           "fc2.weight": ps(num_shards=4, shard_dim=1), "fc2.bias": ps(),
           "fc3.weight": ps(num_shards=3, servers=(3, 3, 0)), "fc3.bias": ps()},
    # P2 = 2 servers (ranks 0 and 1) hold half of every parameter; ranks 2 and 3 are pure workers
    "ps2": {n: ps(num_shards=2, servers=(0, 1)) for n in param_shapes()},
    "sfb": specs_all("sfb"),
    "mix": {"fc1.weight": ps(num_shards=2, servers=(2, 3)), "fc1.bias": ps(servers=(3,)),
            "fc2.weight": SyncSpec(kind="sfb", axes=("dp",)), "fc2.bias": SyncSpec(kind="sfb", axes=("dp",)),
            "fc3.weight": allreduce(0), "fc3.bias": allreduce(0)},
}
SCENARIOS["mix-accum"] = SCENARIOS["mix"]  # the same, in 2 micro-batches per step (the first inside no_sync())
NUM_MICRO = {"mix-accum": 2}


def overlapped(sync: ModelSync) -> dict[str, Any]:
    """All-reduce buckets launched from a gradient hook during backward (wait-free), over the run."""
    return {"overlapped": sum(s.num_overlapped for s in sync.synchronizers if isinstance(s, AllReduceSync))}


@pytest.fixture(scope="module")
def runs() -> list[dict[str, Any]]:
    """Every scenario on 4 ranks (one launch), per rank."""
    return run_ranks(run_scenarios, WORLD, SCENARIOS, STEPS, adamw, overlapped, NUM_MICRO, timeout_s=120)


@pytest.fixture(scope="module")
def ref() -> tuple[list[float], dict[str, torch.Tensor]]:
    return reference(STEPS, adamw)


# ---- expected bytes ------------------------------------------------------------------------------------


def numel(name: str) -> int:
    return int(torch.Size(param_shapes()[name]).numel())


def shard_numels(name: str, spec: SyncSpec) -> list[int]:
    """Numbers per shard (torch.tensor_split: the first pieces one longer when uneven)."""
    size = param_shapes()[name][spec.shard_dim] if spec.num_shards > 1 else 1
    rest = numel(name) // size
    q, extra = divmod(size, spec.num_shards)
    return [(q + (i < extra)) * rest for i in range(spec.num_shards)] if spec.num_shards > 1 else [numel(name)]


def ps_bytes(specs: dict[str, SyncSpec], rank: int) -> int:
    """Bytes rank ``rank`` sends (= receives) per step; round-robin: j-th PS parameter's shard i on (j + i) % n."""
    total = 0
    ps_names = [n for n in param_shapes() if specs[n].kind == "ps"]
    for j, name in enumerate(ps_names):
        spec = specs[name]
        for i, b in enumerate(shard_numels(name, spec)):
            owner = spec.servers[i] if spec.servers else (j + i) % WORLD
            total += (WORLD - 1) * b if owner == rank else b
    return total * F32


def ring_bytes(specs: dict[str, SyncSpec]) -> int:
    """2(n-1)/n * bytes of each all-reduce bucket (every bucket here is a multiple of n numbers)."""
    buckets: dict[int | None, int] = {}
    for name, spec in specs.items():
        if spec.kind == "allreduce":
            buckets[spec.bucket] = buckets.get(spec.bucket, 0) + numel(name) * F32
    assert all(b % (WORLD * F32) == 0 for b in buckets.values())
    return sum(2 * (WORLD - 1) * b // WORLD for b in buckets.values())


def sfb_bytes(specs: dict[str, SyncSpec]) -> int:
    """Sent bytes: K(M+N) numbers per SFB layer to each of the n - 1 peers."""
    layers = [param_shapes()[n] for n, s in specs.items() if s.kind == "sfb" and n.endswith("weight")]
    return sum(K * (m + n) * (WORLD - 1) for m, n in layers) * F32


def expected_sent(specs: dict[str, SyncSpec], rank: int) -> int:
    return ring_bytes(specs) + sfb_bytes(specs) + ps_bytes(specs, rank)


# ---- tests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_matches_single_process(scenario: str, runs: list[dict[str, Any]], ref: tuple[list[float], dict[str, torch.Tensor]]) -> None:
    ref_losses, ref_state = ref
    for rank, result in enumerate(runs):
        got = result[scenario]
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)
        for name, value in got["state"].items():
            torch.testing.assert_close(value, ref_state[name], rtol=RTOL, atol=PARAM_ATOL,
                                       msg=f"{scenario}: rank {rank} parameter {name} after {STEPS} steps")


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_bytes_per_step_equal_the_formulas(scenario: str, runs: list[dict[str, Any]]) -> None:
    specs = SCENARIOS[scenario]
    for rank, result in enumerate(runs):
        want = expected_sent(specs, rank)
        for step, counts in enumerate(result[scenario]["bytes"]):
            assert counts["sync.sent_bytes"] == want, f"{scenario}: rank {rank} step {step} sent {counts}"
            assert counts["sync.recv_bytes"] == want, f"{scenario}: rank {rank} step {step} received {counts}"


def test_poseidon_ps_and_sfb_formulas(runs: list[dict[str, Any]]) -> None:
    # "ps2": every parameter in 2 halves on ranks 0 and 1 (P1 = 4 workers, P2 = 2 servers); MN = all numbers
    mn = sum(numel(n) for n in param_shapes()) * F32
    p1, p2 = WORLD, 2
    for rank, result in enumerate(runs):
        moved = result["ps2"]["bytes"][0]["sync.sent_bytes"] + result["ps2"]["bytes"][0]["sync.recv_bytes"]
        if rank >= p2:  # a pure worker pushes MN and pulls MN
            assert moved == 2 * mn
        else:  # worker 2MN + server 2*P1*MN/P2, less its own shard's push and pull on both sides (never on the wire)
            assert moved == 2 * mn + 2 * p1 * mn // p2 - 4 * mn // p2
    # "sfb": 2K(P1-1)(M+N) numbers per layer per worker
    layers = [param_shapes()[f"fc{i}.weight"] for i in (1, 2, 3)]
    for result in runs:
        counts = result["sfb"]["bytes"][0]
        assert counts["sync.sent_bytes"] + counts["sync.recv_bytes"] == sum(2 * K * (WORLD - 1) * (m + n) for m, n in layers) * F32


def test_live_step_bytes_are_what_metrics_record(runs: list[dict[str, Any]]) -> None:
    # the dict read right after finish() (what a metrics line would hold) already has the worker's own traffic
    for result in runs:
        live = result["allreduce"]["live_bytes"]
        assert live == result["allreduce"]["bytes"]
        assert set(live[0]) == {"sync.sent_bytes", "sync.recv_bytes", "sync.allreduce.sent_bytes", "sync.allreduce.recv_bytes"}


def test_buckets_launch_during_backward(runs: list[dict[str, Any]]) -> None:
    # every bucket is complete before backward ends, so each is launched from a hook, none by finish();
    # with accumulation only the last micro-batch's backward launches
    for result in runs:
        assert result["allreduce"]["overlapped"] == 3 * STEPS
        assert result["mix-accum"]["overlapped"] == STEPS
