"""Cost entries of the synchronizers: the byte counts docs/sync.md measured, Poseidon's rule, hand-computed times."""

from __future__ import annotations

import pytest

from plait.cluster import Cluster, cluster_from_dict
from plait.cost import CostModel
from plait.cost.sync_cost import (
    SFBLayerSize,
    SyncStep,
    allreduce_payload,
    allreduce_sent_bytes,
    allreduce_steps,
    chain_time,
    hybcomm_prefers_sfb,
    ps_colocated_floats,
    ps_server_floats,
    ps_steps,
    ps_worker_floats,
    server_loads,
    sfb_crossover_batch,
    sfb_sent_bytes,
    sfb_steps,
    sfb_worker_floats,
    split_sizes,
)

N = 4  # ranks of the measured runs (docs/sync.md): MLP 16 -> 32 -> 32 -> 8, K = 4 rows per worker
BUCKETS = [[(8, 32), (8,)], [(32, 32), (32,)], [(32, 16), (32,)]]  # fc3, fc2, fc1 (backward order)
SHAPES = {"fc1.weight": (32, 16), "fc1.bias": (32,), "fc2.weight": (32, 32), "fc2.bias": (32,),
          "fc3.weight": (8, 32), "fc3.bias": (8,)}
US, GB = 1e-6, 1e9


def cluster(kind: str = "cuda", nodes: int = 1, devices: int = 4) -> Cluster:
    """Round numbers: intra-node links of 10 us and 100 GB/s, inter-node 20 us and 10 GB/s."""
    return cluster_from_dict({
        "name": f"sync-{kind}:{nodes}", "num_nodes": nodes, "devices_per_node": devices,
        "device": {"name": "d", "kind": kind, "peak_tflops": {"fp32": 100, "bf16": 400}, "memory_gb": 80,
                   "memory_bandwidth_gb_s": 2000},
        "links": {"intra_node": {"latency_us": 10, "bandwidth_gb_s": 100},
                  "inter_node": {"latency_us": 20, "bandwidth_gb_s": 10}},
    }, where="test")


def ring(op: str, nbytes: float, n: int, latency: float = 10 * US, bw: float = 100 * GB) -> float:
    """The ring formula by hand: all_reduce 2(n-1) steps and 2(n-1)/n of the bytes, gathers and all-to-all half."""
    steps, frac = (2 * (n - 1), 2 * (n - 1) / n) if op == "all_reduce" else (n - 1, (n - 1) / n)
    return steps * latency + frac * nbytes / bw


# ---- bytes: the numbers docs/sync.md reports for 4 gloo ranks ------------------------------------------


def test_allreduce_bytes_match_the_measured_runs() -> None:
    assert sum(allreduce_sent_bytes(b, N) for b in BUCKETS) == 11184
    assert sum(allreduce_sent_bytes(b, N, compress="fp16") for b in BUCKETS) == 5592
    assert sum(allreduce_sent_bytes(b, N, compress="bf16") for b in BUCKETS) == 5592
    assert sum(allreduce_sent_bytes(b, N, compress="powersgd", rank=1) for b in BUCKETS) == 1344
    assert sum(allreduce_sent_bytes(b, N, compress="powersgd", rank=2) for b in BUCKETS) == 2256


def test_powersgd_leaves_matrices_not_worth_factoring() -> None:
    assert allreduce_payload([(4, 4)], compress="powersgd", rank=2) == 4 * 16  # 2 * 8 = 16, not < 16
    assert allreduce_payload([(4, 4)], compress="powersgd", rank=1) == 4 * 8
    assert allreduce_payload([(3, 2, 5)], compress="powersgd", rank=9) == 4 * 30  # r = 3: 39 numbers > 30
    assert allreduce_payload([(64, 2, 8)], compress="powersgd", rank=4) == 4 * 4 * (64 + 16)  # (64, 16) matrix


def _loads(specs: dict[str, tuple[int, int, tuple[int, ...]]]) -> tuple[int, ...]:
    params = [(SHAPES[n], k, dim, servers) for n, (k, dim, servers) in specs.items()]
    return server_loads(params, N).sent_bytes()


def test_parameter_server_bytes_match_the_measured_runs() -> None:
    halves = dict.fromkeys(SHAPES, (2, 0, (0, 1)))  # P2 = 2 servers hold half of every parameter
    assert _loads(halves) == (14912, 14912, 7456, 7456)
    mixed = {"fc1.weight": (2, 0, (0, 1)), "fc1.bias": (1, 0, (2,)), "fc2.weight": (4, 1, ()), "fc2.bias": (1, 0, ()),
             "fc3.weight": (3, 0, (3, 3, 0)), "fc3.bias": (1, 0, ())}  # explicit, uneven and round-robin
    assert _loads(mixed) == (12064, 11616, 9760, 11296)


def test_sfb_bytes_match_the_measured_run() -> None:
    layers = [SFBLayerSize(rows=4, out_features=m, in_features=n, bias=True) for m, n in ((32, 16), (32, 32), (8, 32))]
    assert sfb_sent_bytes(layers, N) == 7296
    assert 2 * sfb_sent_bytes(layers, N) == 4 * sum(sfb_worker_floats(4, m, n, N) for m, n in ((32, 16), (32, 32), (8, 32)))


def test_split_sizes_follow_tensor_split() -> None:
    assert split_sizes(8, 3) == [3, 3, 2]
    assert split_sizes(32, 4) == [8] * 4
    assert split_sizes(5, 1) == [5]


# ---- Poseidon's counts and the HybComm rule (notes/sync.md section 8) --------------------------------------


def test_poseidon_counts() -> None:
    assert ps_worker_floats(4096, 4096) == 2 * 4096 * 4096
    assert ps_server_floats(10, 20, num_workers=8, num_servers=2) == 2 * 8 * 200 / 2
    assert ps_colocated_floats(4096, 25088, 8, 8) == pytest.approx(3.5966e8, rel=1e-4)
    assert sfb_worker_floats(32, 4096, 25088, 8) == 13_074_432


def test_hybcomm_worked_cases() -> None:
    assert hybcomm_prefers_sfb(32, 4096, 25088, 8, 8)
    assert ps_colocated_floats(4096, 25088, 8, 8) / sfb_worker_floats(32, 4096, 25088, 8) == pytest.approx(27.5, abs=0.05)
    assert ps_colocated_floats(4096, 4096, 8, 8) / sfb_worker_floats(32, 4096, 4096, 8) == pytest.approx(16)
    assert hybcomm_prefers_sfb(50, 4096, 1000, 32, 32) and not hybcomm_prefers_sfb(51, 4096, 1000, 32, 32)
    assert hybcomm_prefers_sfb(32, 4096, 1000, 32, 32) and not hybcomm_prefers_sfb(256, 4096, 1000, 32, 32)
    assert sfb_crossover_batch(4096, 1000, 32, 32) == pytest.approx(50.236, abs=1e-3)
    assert sfb_crossover_batch(4096, 4096, 8, 8) == pytest.approx(512)
    assert not hybcomm_prefers_sfb(1, 10, 10, 1, 1)  # one worker: nothing to synchronise


# ---- times against hand-computed values ---------------------------------------------------------------------


def test_plain_allreduce_time_is_a_scaling_pass_and_a_ring() -> None:
    cost = CostModel(cluster())
    nbytes = 4 * 1_000_000
    expected = max(2 * nbytes / 2000e9, 10 * US) + min(ring("all_reduce", nbytes, N),
                                                       4 * 10 * US + 2 * nbytes / (100 * GB))  # ring or tree (2 levels)
    assert chain_time(allreduce_steps("b", [(1000, 1000)]), cost, range(N)) == pytest.approx(expected, rel=1e-12)


def test_fp16_allreduce_halves_the_ring_bytes() -> None:
    cost = CostModel(cluster())
    steps = allreduce_steps("b", [(1000, 1000)], compress="fp16")
    collective = [s for s in steps if s.kind == "collective"]
    # the runtime's own ring over point-to-point messages: a reduce-scatter, then an all-gather, of the half bytes
    assert [(s.collective, s.nbytes) for s in collective] == [("p2p_ring", 2_000_000), ("p2p_ring", 2_000_000)]
    assert all(s.stream == "comm" for s in steps)  # the communication thread casts
    casts = sum(max(s.bytes_moved / 2000e9, s.num_kernels * 10 * US) for s in steps if s.kind == "compute")
    ring_s = 2 * (N - 1) * (10 * US + 2e6 / N / (100 * GB))  # 2(n-1) steps, each one chunk over one hop
    assert ring_s == pytest.approx(ring("all_reduce", 2e6, N))  # on one level of links: the ring all-reduce
    assert chain_time(steps, cost, range(N)) == pytest.approx(casts + ring_s, rel=1e-12)


def test_powersgd_steps_count_factors_and_matmuls() -> None:
    n, m, r = 512, 256, 4
    steps = allreduce_steps("b", [(n, m), (n,)], compress="powersgd", rank=r)
    reduces = [s.nbytes for s in steps if s.name.startswith("ring reduce_scatter")]
    assert reduces == [4 * n * r, 4 * m * r, 4 * n]  # P, Q, then the vector uncompressed, each by the runtime's ring
    assert reduces == [s.nbytes for s in steps if s.name.startswith("ring all_gather")]
    assert {s.collective for s in steps if s.kind == "collective"} == {"p2p_ring"}
    assert sum(s.flops for s in steps) == 3 * 2 * n * m * r + 4 * n * r * r
    assert allreduce_sent_bytes([(n, m), (n,)], N, compress="powersgd", rank=r) == 1.5 * sum(reduces)


def test_ps_time_at_staleness_zero_is_pack_push_sum_step_answer_pull_unpack() -> None:
    cost = CostModel(cluster())
    loads = server_loads([((1000, 100), 1, 0, (0,)), ((500, 100), 1, 0, (1,))], N)  # 400 kB and 200 kB
    t, busiest, hot = 600_000, 3 * 400_000, 400_000  # rank 0 answers 3 workers its 400 kB
    assert loads.busiest == busiest
    exchange = 3 * (10 * US + hot / (100 * GB))  # rank 0 receives (sends) 3 messages of 400 kB, one at a time
    assert exchange == pytest.approx(3 * 10 * US + busiest / (100 * GB))

    def work(nbytes: float, kernels: int) -> float:
        return max(nbytes / 2000e9, kernels * 10 * US)

    pack, unpack = work(2 * t, N), work(2 * t, 2)  # one message per server; one copy per shard
    server = work((3 * N + 1) * hot, N + 1) + work(2 * N * hot, N)  # sum of the N pushes; N answers' snapshots
    expected = pack + 2 * exchange + server + cost.optimizer_time(100_000, num_tensors=1) + unpack
    assert chain_time(ps_steps(loads), cost, range(N)) == pytest.approx(expected, rel=1e-12)


def test_ps_staleness_takes_the_server_sum_and_step_off_the_critical_path_where_comm_overlaps() -> None:
    loads = server_loads([((4096, 4096), 4, 0, ())], N)
    gpu = CostModel(cluster())
    sync0, sync1 = (chain_time(ps_steps(loads, staleness=s), gpu, range(N)) for s in (0, 1))
    steps = {s.name: s for s in ps_steps(loads)}
    off = gpu.optimizer_time(4096 * 1024, num_tensors=1) + chain_time([steps["ps server sum"]], gpu, range(N))
    pull_s = gpu.collective_time("p2p_serial", steps["ps pull"].nbytes, range(N))
    assert sync0 - sync1 == pytest.approx(off + pull_s - max(off, pull_s), rel=1e-9)
    cpu = CostModel(cluster("cpu"))  # CPU ranks do not overlap: the same time
    assert chain_time(ps_steps(loads, staleness=1), cpu, range(N)) == pytest.approx(chain_time(ps_steps(loads), cpu, range(N)))


def test_sfb_time_is_an_all_gather_and_the_rebuild() -> None:
    cost = CostModel(cluster())
    layer = SFBLayerSize(rows=32, out_features=4096, in_features=1024, bias=True)
    gathered = N * 4 * 32 * (4096 + 1024)
    rows = N * 32
    rebuild = cost.compute_time(2.0 * 4096 * 1024 * rows + rows * 4096, 4 * (rows * 5120 + 4096 * 1024), num_kernels=4)
    expected = ring("all_gather", gathered, N) + rebuild
    assert chain_time(sfb_steps([layer], N), cost, range(N)) == pytest.approx(expected, rel=1e-12)


def test_chain_steps_wait_for_their_dependency_only() -> None:
    cost = CostModel(cluster())
    a = SyncStep(name="a", kind="collective", stream="comm", collective="all_to_all", nbytes=10**8)
    b = SyncStep(name="b", kind="compute", bytes_moved=4e9, num_kernels=1, after=-1)  # needs nothing
    c = SyncStep(name="c", kind="compute", bytes_moved=1.0, num_kernels=1, after=0)
    ta, tb = cost.collective_time("all_to_all", 10**8, range(N)), 4e9 / 2000e9
    assert chain_time([a, b, c], cost, range(N)) == pytest.approx(max(ta, tb) + 10 * US)
