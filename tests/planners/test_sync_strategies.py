"""Strategy builders (graph + cluster -> SyncSpec per parameter), their registry and errors, and the lowering that
lets the simulator price them: the simulated step follows the cost entries."""

from __future__ import annotations

from dataclasses import replace

import pytest
from plankit import dense_graph, gpu_cluster

from plait.cluster import Cluster, cluster_from_dict
from plait.cost import CostModel
from plait.cost.sync_cost import server_loads
from plait.errors import PlaitError
from plait.graph import LayerInfo, ModelGraph, ParamInfo
from plait.graph.model_graph import OpNode, TensorMeta
from plait.plan.ir import Plan, SyncSpec
from plait.planners import build_dp_plan
from plait.planners.sync_lowering import apply_sync, bucket_steps, context_of, runs_runtime_ring, sync_times
from plait.planners.sync_strategies import (
    SYNC_BUILDERS,
    AllReduce,
    HybComm,
    PartitionedPS,
    PSLoadBalancing,
    SyncContext,
    param_roles,
    sync_builder,
)

T = 16  # tokens per example of the toy language model


def _layer(index: int, name: str, kind: str, params: list[ParamInfo], out: tuple[int, ...], batch: int) -> LayerInfo:
    numel = sum(p.numel for p in params)
    return LayerInfo(index=index, name=name, kind=kind, fwd_flops=2 * numel * batch * T, bwd_flops=4 * numel * batch * T,
                     num_params=numel, param_bytes=4 * numel, activation_bytes=4 * batch * T * out[-1],
                     output_bytes=4 * batch * T * out[-1], output_shape=out, fwd_bytes_moved=4 * numel, num_kernels=2)


def _op(name: str, target: str, module: str, inputs: tuple[str, ...], out: tuple[int, ...]) -> OpNode:
    return OpNode(name=name, target=target, module=module, inputs=(), outputs=(TensorMeta(shape=out, dtype="fp32"),),
                  flops=0, input_nodes=inputs)


def lm_graph(batch: int = 4, *, with_ops: bool = True, vocab: int = 1000) -> ModelGraph:
    """embed (Embedding vocab x 64), fc (Linear 64 -> 256), norm (LayerNorm 256), head (Linear 256 -> vocab, no bias)."""
    shapes = [("embed", "Embedding", [("weight", (vocab, 64))], 64), ("fc", "Linear", [("weight", (256, 64)), ("bias", (256,))], 256),
              ("norm", "LayerNorm", [("weight", (256,)), ("bias", (256,))], 256), ("head", "Linear", [("weight", (vocab, 256))], vocab)]
    layers, params = [], []
    for i, (name, kind, ps, width) in enumerate(shapes):
        mine = [ParamInfo(name=f"{name}.{leaf}", shape=s, dtype="fp32", layer=i) for leaf, s in ps]
        params += mine
        layers.append(_layer(i, name, kind, mine, (batch, T, width), batch))
    ops = (_op("embedding", "aten.embedding.default", "embed", ("embed.weight", "batch_0"), (batch, T, 64)),
           _op("linear", "aten.linear.default", "fc", ("embedding", "fc.weight", "fc.bias"), (batch, T, 256)),
           _op("layer_norm", "aten.layer_norm.default", "norm", ("linear", "norm.weight", "norm.bias"), (batch, T, 256)),
           _op("linear_1", "aten.linear.default", "head", ("layer_norm", "head.weight"), (batch, T, vocab)))
    return ModelGraph(name="lm", dtype="fp32", batch_size=batch, input_shapes=((batch, T),), layers=tuple(layers),
                      params=tuple(params), ops=ops if with_ops else ())


def fc_context(m: int, n: int, k: int, workers: int) -> SyncContext:
    """One Linear(N -> M) layer with one row per example, K examples per worker, on ``workers`` GPUs."""
    p = ParamInfo(name="fc.weight", shape=(m, n), dtype="fp32", layer=0)
    graph = ModelGraph(name="fc", dtype="fp32", batch_size=1, input_shapes=((1, n),), params=(p,),
                       layers=(_layer(0, "fc", "Linear", [p], (1, m), 1),))
    cluster = gpu_cluster(max(1, workers // 8), devices=min(8, workers))
    return SyncContext(graph=graph, cluster=cluster, axes=("dp",), group=tuple(range(workers)), examples_per_step=k,
                       roles=param_roles(graph))


def lm_context(workers: int = 4, examples: int = 2) -> SyncContext:
    graph = lm_graph()
    return SyncContext(graph=graph, cluster=gpu_cluster(devices=workers), axes=("dp",), group=tuple(range(workers)),
                       examples_per_step=examples, roles=param_roles(graph))


def kinds(specs: dict[str, SyncSpec]) -> dict[str, str]:
    return {n: s.kind for n, s in specs.items()}


# ---- roles -------------------------------------------------------------------------------------------


def test_roles_from_ops_and_from_the_layer_view() -> None:
    for graph in (lm_graph(), lm_graph(with_ops=False)):
        roles = param_roles(graph)
        assert [roles[n].kind for n in ("embed.weight", "fc.weight", "fc.bias", "norm.weight", "head.weight")] == \
            ["embedding", "linear", "linear", "other", "linear"]
        assert roles["fc.weight"].rows_per_example == T  # tokens of a sequence are the Linear's rows


def test_a_weight_used_by_two_modules_is_other() -> None:
    graph = lm_graph()
    tied = _op("linear_2", "aten.linear.default", "head", ("layer_norm", "embed.weight"), (4, T, 1000))
    roles = param_roles(replace(graph, ops=(*graph.ops, tied)))
    assert roles["embed.weight"].kind == "other"


def test_the_module_must_confirm_a_role() -> None:
    torch = pytest.importorskip("torch")
    model = torch.nn.Module()
    model.fc = torch.nn.Linear(64, 256)
    model.head = torch.nn.Module()  # a custom module whose forward calls F.linear on its own weight
    model.embed = torch.nn.Embedding(1000, 64)
    roles = param_roles(lm_graph(), model)
    assert roles["fc.weight"].kind == "linear" and roles["embed.weight"].kind == "embedding"
    assert roles["head.weight"].kind == "other"


# ---- builders ----------------------------------------------------------------------------------------


def test_allreduce_and_ps_cover_every_parameter() -> None:
    ctx = lm_context()
    assert set(kinds(AllReduce(compress="bf16").build(ctx)).values()) == {"allreduce"}
    assert {s.compress for s in AllReduce(compress="bf16").build(ctx).values()} == {"bf16"}
    ps = sync_builder("ps:staleness=2").build(ctx)
    assert {(s.kind, s.servers, s.staleness) for s in ps.values()} == {("ps", (), 2)}  # the runtime's round-robin


def test_load_balancing_is_greedy_by_bytes() -> None:
    ctx = lm_context(workers=3)
    specs = PSLoadBalancing().build(ctx)
    # embed 256000 B -> 0; fc.weight 65536 -> 1; fc.bias, norm.weight, norm.bias 1024 each -> 2; head -> 2 (3072 B)
    assert [specs[n].servers for n in ("embed.weight", "fc.weight", "fc.bias", "norm.weight", "norm.bias", "head.weight")] \
        == [(0,), (1,), (2,), (2,), (2,), (2,)]


def test_partitioned_ps_splits_large_tensors_over_distinct_servers() -> None:
    ctx = lm_context(workers=4)
    specs = PartitionedPS().build(ctx)
    head = specs["head.weight"]  # 1 MB of 1.35 MB: above an even server's share
    assert (head.num_shards, head.shard_dim, sorted(head.servers)) == (4, 0, [0, 1, 2, 3])
    assert specs["fc.weight"].num_shards == 1
    loads = server_loads([(p.shape, specs[p.name].num_shards, 0, specs[p.name].servers) for p in ctx.graph.params], 4)
    assert max(loads.bytes) - min(loads.bytes) <= 256_000  # the embedding is the largest whole piece
    assert PartitionedPS(num_shards=3, min_bytes=0).build(ctx)["fc.bias"].num_shards == 3


def test_parallax_sends_embeddings_to_the_server() -> None:
    specs = sync_builder("parallax").build(lm_context())
    assert kinds(specs) == {"embed.weight": "ps", "fc.weight": "allreduce", "fc.bias": "allreduce",
                            "norm.weight": "allreduce", "norm.bias": "allreduce", "head.weight": "allreduce"}


def test_hybcomm_acceptance_cases() -> None:
    assert kinds(HybComm().build(fc_context(4096, 25088, 32, 8))) == {"fc.weight": "sfb"}
    assert kinds(HybComm().build(fc_context(4096, 1000, 50, 32))) == {"fc.weight": "sfb"}
    assert kinds(HybComm().build(fc_context(4096, 1000, 51, 32))) == {"fc.weight": "ps"}


def test_hybcomm_keeps_non_linear_parameters_on_the_server() -> None:
    specs = HybComm().build(lm_context(workers=4, examples=1))  # K = 16 rows per worker
    # fc 256 x 64: 2*16*3*320 = 30720 <= 2*256*64*6/4 = 49152 -> SFB (bias too); head 1000 x 256: SFB as well
    assert kinds(specs) == {"embed.weight": "ps", "fc.weight": "sfb", "fc.bias": "sfb", "norm.weight": "ps",
                            "norm.bias": "ps", "head.weight": "sfb"}
    assert kinds(HybComm().build(lm_context(workers=4, examples=8)))["fc.weight"] == "ps"  # K = 128


def test_auto_picks_sfb_for_a_wide_layer_at_a_small_batch_and_allreduce_otherwise() -> None:
    assert kinds(sync_builder("auto").build(fc_context(8192, 8192, 1, 8))) == {"fc.weight": "sfb"}
    assert kinds(sync_builder("auto").build(fc_context(64, 64, 512, 8))) == {"fc.weight": "allreduce"}
    assert kinds(sync_builder("auto:kinds=ps").build(fc_context(64, 64, 512, 8))) == {"fc.weight": "ps"}
    assert kinds(sync_builder("auto:kinds=ps+sfb").build(fc_context(8192, 8192, 1, 8))) == {"fc.weight": "sfb"}


# ---- registry and errors ---------------------------------------------------------------------------------


def test_registry_names_and_options() -> None:
    assert list(SYNC_BUILDERS) == ["allreduce", "ps", "ps-load-balancing", "partitioned-ps", "parallax", "hybcomm", "auto"]
    assert isinstance(sync_builder("PSLoadBalancing"), PSLoadBalancing)  # AutoDist's spelling
    builder = sync_builder("allreduce:compress=powersgd,rank=2,error_feedback=false")
    assert builder.spec(("dp",)) == SyncSpec(kind="allreduce", axes=("dp",), compress="powersgd", compress_rank=2,
                                             error_feedback=False)


@pytest.mark.parametrize("text,needle", [
    ("nope", "unknown sync strategy 'nope'; choose one of allreduce, ps, ps-load-balancing"),
    ("ps:speed=2", "'speed=2' is not an option; it takes staleness=..."),
    ("allreduce:compress=zip", "compress 'zip' is not one of fp16, bf16, powersgd"),
    ("ps:staleness=-1", "staleness -1 is negative"),
    ("auto:kinds=rs", "auto sync: kinds"),
    ("ps:staleness=abc", "sync strategy 'ps': bad option value"),
])
def test_registry_errors_name_the_problem(text: str, needle: str) -> None:
    with pytest.raises(PlaitError, match=None) as info:
        sync_builder(text)
    assert needle in str(info.value)


def _plan(graph: ModelGraph, cluster: Cluster, **kwargs: object) -> Plan:
    return build_dp_plan(graph, cluster, kind="replicate", global_batch=graph.batch_size * cluster.world_size, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("specs,needle", [
    ({"norm.weight": SyncSpec(kind="sfb", axes=("dp",))}, "SFB synchronises nn.Linear weights and biases of layers not "
                                                           "recomputed; module 'norm' is not an nn.Linear"),
    ({"fc.bias": SyncSpec(kind="sfb", axes=("dp",))}, "give 'fc.weight' kind 'sfb' too"),
    ({"fc.weight": SyncSpec(kind="reduce_scatter", axes=("dp",))}, "kind 'reduce_scatter' is FSDP2's"),
    ({"fc.weight": SyncSpec(kind="ps", axes=("dp",), servers=(7,))}, "servers (7,) are not positions in a group of 4"),
    ({"fc.bias": SyncSpec(kind="ps", axes=("dp",), num_shards=300)}, "300 shards along dim 0 do not fit its shape (256,)"),
    ({"fc.bias": SyncSpec(kind="allreduce", axes=("tp",))}, "spans axes ('tp',)"),
])
def test_apply_sync_rejects_specs_that_do_not_fit(specs: dict[str, SyncSpec], needle: str) -> None:
    graph = lm_graph()
    plan = _plan(graph, gpu_cluster())
    full = {p.name: SyncSpec(kind="allreduce", axes=("dp",)) for p in graph.params} | specs
    with pytest.raises(PlaitError) as info:
        apply_sync(plan, graph, full)
    assert needle in str(info.value)
    with pytest.raises(PlaitError, match="missing"):
        apply_sync(plan, graph, specs)


def test_no_sfb_in_recomputed_layers() -> None:
    graph = lm_graph()
    plan = _plan(graph, gpu_cluster(), recompute=True)
    assert "sfb" not in {p.sync.kind for p in apply_sync(plan, graph, "hybcomm").params}
    specs = {p.name: SyncSpec(kind="sfb" if p.name.startswith("fc.") else "allreduce", axes=("dp",)) for p in graph.params}
    with pytest.raises(PlaitError, match="its layer is recomputed"):
        apply_sync(plan, graph, specs)
    assert {p.sync.kind for p in apply_sync(_plan(graph, gpu_cluster()), graph, specs).params} == {"sfb", "allreduce"}


def test_apply_sync_refuses_sharded_plans() -> None:
    graph = dense_graph(2, 64, 4)
    plan = build_dp_plan(graph, gpu_cluster(), kind="fsdp", global_batch=16)
    with pytest.raises(PlaitError, match="replicated data-parallel plans"):
        apply_sync(plan, graph, "ps")


# ---- the lowering: the simulated step follows the cost entries ------------------------------------------------


def test_allreduce_builder_reproduces_the_default_plan() -> None:
    graph = dense_graph(6, 512, 8)
    plan = _plan(graph, gpu_cluster(), bucket_bytes=2 << 20)
    again = apply_sync(plan, graph, "allreduce")
    assert again.programs == plan.programs and again.buckets == plan.buckets and again.params == plan.params
    assert again.provenance is not None and again.provenance.options["sync"] == "allreduce"


def _none(plan: Plan, graph: ModelGraph) -> Plan:
    return apply_sync(plan, graph, {p.name: SyncSpec(kind="none") for p in graph.params})


@pytest.mark.parametrize("strategy,entry", [("ps", "ps-s0"), ("ps:staleness=1", "ps-s1"), ("ps-load-balancing", "ps-s0"),
                                            ("partitioned-ps:min_bytes=0", "ps-s0")])
def test_simulated_step_adds_the_parameter_server_entry(strategy: str, entry: str) -> None:
    graph, cluster = lm_graph(), gpu_cluster(2, inter_gb_s=5)
    cost = CostModel(cluster)
    plan = _plan(graph, cluster)
    base, synced = _none(plan, graph), apply_sync(plan, graph, strategy, cost=cost)
    times = sync_times(synced, cost)
    assert list(times) == [entry]
    local = cost.optimizer_time(0, num_tensors=0) - cost.optimizer_time(graph.num_params, num_tensors=len(graph.params))
    assert synced.predicted is not None and base.predicted is not None
    assert synced.predicted.step_s == pytest.approx(base.predicted.step_s + times[entry] + local, rel=1e-9)


def test_simulated_step_adds_the_sfb_entry() -> None:
    graph, cluster = lm_graph(), gpu_cluster()
    cost = CostModel(cluster)
    plan = _plan(graph, cluster)
    synced = apply_sync(plan, graph, "hybcomm", cost=cost)
    sfb = [n for n, p in zip(graph.params, synced.params, strict=True) if p.sync.kind == "sfb"]
    assert sfb  # K = 4 examples x 16 tokens = 64 rows: fc and head go by SFB
    only_sfb = {p.name: p.sync if p.sync.kind == "sfb" else SyncSpec(kind="none") for p in synced.params}
    ctx = context_of(plan, graph, cost=cost)
    rows = {n: ctx.rows(n) for n in only_sfb}
    synced = apply_sync(plan, graph, only_sfb, cost=cost)
    entry = sync_times(synced, cost, rows)["sfb"]
    assert synced.predicted is not None and _none(plan, graph).predicted is not None
    assert synced.predicted.step_s == pytest.approx(_none(plan, graph).predicted.step_s + entry, rel=1e-9)


def cpu_cluster(ranks: int = 4) -> Cluster:
    """A CPU cluster without a profile: one lane per rank, so every entry adds to the step."""
    return cluster_from_dict({"name": f"cpu:{ranks}", "num_nodes": 1, "devices_per_node": ranks,
                              "device": {"name": "c", "kind": "cpu", "peak_tflops": {"fp32": 1}, "memory_gb": 16,
                                         "memory_bandwidth_gb_s": 20},
                              "links": {"intra_node": {"latency_us": 20, "bandwidth_gb_s": 5},
                                        "inter_node": {"latency_us": 50, "bandwidth_gb_s": 1}}}, where="test")


@pytest.mark.parametrize("compress", ["none", "fp16", "powersgd,rank=2"])
def test_simulated_step_adds_each_bucket_entry_on_cpu_ranks(compress: str) -> None:
    graph, cluster = lm_graph(), cpu_cluster()
    cost = CostModel(cluster)
    plan = _plan(graph, cluster, bucket_bytes=300_000)
    synced = apply_sync(plan, graph, f"allreduce:compress={compress}", cost=cost)
    times = sync_times(synced, cost)
    assert len(times) == len(synced.buckets) >= 3
    assert synced.predicted is not None and _none(plan, graph).predicted is not None
    assert synced.predicted.step_s == pytest.approx(_none(plan, graph).predicted.step_s + sum(times.values()), rel=1e-9)


def test_auto_never_simulates_slower_than_allreduce() -> None:
    graph, cluster = dense_graph(4, 2048, 2), gpu_cluster(2, inter_gb_s=1)
    plan = _plan(graph, cluster)
    auto = apply_sync(plan, graph, "auto")
    assert auto.predicted is not None and plan.predicted is not None
    assert auto.predicted.step_s <= plan.predicted.step_s * (1 + 1e-12)


def test_buckets_of_a_plan_with_runtime_synchronizers_run_the_runtime_ring() -> None:
    graph, cluster = lm_graph(), gpu_cluster(2, inter_gb_s=5)
    plan = _plan(graph, cluster)
    axes = plan.data_parallel_axes
    plain = apply_sync(plan, graph, "allreduce")
    mixed = apply_sync(plan, graph, {p.name: SyncSpec(kind="ps" if p.name == "embed.weight" else "allreduce", axes=axes)
                                     for p in graph.params})
    assert not runs_runtime_ring(plain) and runs_runtime_ring(mixed)  # as plait.runtime.apply.uses_runtime_sync
    collectives = {s.collective for b in plain.buckets for s in bucket_steps(plain, b) if s.kind == "collective"}
    assert collectives == {"all_reduce"}  # the wait-free buckets: the backend's all-reduce
    collectives = {s.collective for b in mixed.buckets for s in bucket_steps(mixed, b) if s.kind == "collective"}
    assert collectives == {"p2p_ring"}  # ModelSync's AllReduceSync: the flat point-to-point ring
    program = mixed.programs[0].instrs
    rings = [i for i in program if i.collective == "p2p_ring"]
    assert rings and all(i.group == tuple(plan.mesh.group(0, axes)) for i in rings)
