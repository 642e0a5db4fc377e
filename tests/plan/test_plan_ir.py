"""The Plan IR: JSON round trip, validation, atomic save, readable table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plait.cluster import load_cluster
from plait.errors import PlaitError
from plait.graph import LayerInfo, ModelGraph, ParamInfo
from plait.plan import (
    REPLICATE,
    ActivationPlan,
    BatchSpec,
    Bucket,
    Instr,
    LayerPlan,
    MemoryEstimate,
    MeshSpec,
    ParamPlan,
    Placement,
    Plan,
    PrecisionPolicy,
    Prediction,
    RankProgram,
    SyncSpec,
    load_plan,
    plan_from_json,
    plan_text,
    plan_to_json,
    save_plan,
    shard,
)


def _plan() -> Plan:
    layer = LayerInfo(index=0, name="fc", kind="Linear", fwd_flops=10, bwd_flops=20, num_params=40, param_bytes=160,
                      activation_bytes=8, output_bytes=8, output_shape=(2, 4), fwd_bytes_moved=3, num_kernels=1)
    graph = ModelGraph(name="m", dtype="fp32", batch_size=2, input_shapes=((2, 8),), layers=(layer,),
                       params=(ParamInfo(name="fc.weight", shape=(4, 8), dtype="fp32", layer=0),
                               ParamInfo(name="fc.bias", shape=(4,), dtype="fp32", layer=0)))
    sync = SyncSpec(kind="allreduce", axes=("dp",), bucket=0)
    return Plan(
        model=graph,
        cluster=load_cluster("dgx-a100:2"),
        mesh=MeshSpec(shape=(16,), axes=("dp",)),
        batch=BatchSpec(global_size=32, micro_size=2, placements=(shard(0),)),
        params=(ParamPlan(name="fc.weight", placements=(REPLICATE,), sync=sync),
                ParamPlan(name="fc.bias", placements=(REPLICATE,), sync=sync)),
        activations=(ActivationPlan(module="fc", port="output", placements=(shard(0),)),),
        buckets=(Bucket(index=0, params=("fc.bias", "fc.weight"), nbytes=144, ready_after_layer=0),),
        precision=PrecisionPolicy(compute_dtype="bf16"),
        layers=(LayerPlan(name="fc", recompute=True),),
        programs=(RankProgram(ranks=tuple(range(16)), instrs=(
            Instr(op="compute", stream="compute", name="fwd fc", phase="fwd", layer=0, flops=10.0),
            Instr(op="collective", stream="comm", name="all_reduce b0", collective="all_reduce", nbytes=144,
                  group=tuple(range(16)), deps=(0,)),
        )),),
        predicted=Prediction(step_s=0.01, compute_s=0.008, comm_s=0.004, exposed_comm_s=0.002,
                             peak_memory_bytes=(1000,) * 16,
                             memory=MemoryEstimate(params=160, grads=160, optimizer=320, activations=8, buffers=0)),
    )


def test_json_round_trip_is_exact() -> None:
    plan = _plan()
    text = plan_to_json(plan)
    again = plan_from_json(text)
    assert again == plan
    assert plan_to_json(again) == text
    raw = json.loads(text)
    assert raw["mesh"] == {"shape": [16], "axes": ["dp"]} and raw["version"] == 2
    assert raw["params"][0]["placements"] == ["Replicate()"] and raw["batch"]["placements"] == ["Shard(0)"]
    assert raw["precision"] == {"param_dtype": "fp32", "compute_dtype": "bf16", "reduce_dtype": "fp32"}


def test_placements_parse_and_print() -> None:
    for text, expected in [("Shard(1)", shard(1)), ("Shard(dim=-1)", shard(-1)), ("S(0)", shard(0)), ("R", REPLICATE),
                           ("Replicate()", REPLICATE), ("Partial(sum)", Placement("partial")), ("P", Placement("partial"))]:
        assert Placement.parse(text) == expected
        assert Placement.parse(str(expected)) == expected
    with pytest.raises(ValueError, match="not a placement"):
        Placement.parse("Sharded")
    with pytest.raises(ValueError, match="needs dim"):
        Placement("shard")
    from torch.distributed.tensor import Partial, Replicate, Shard

    assert shard(2).to_dtensor() == Shard(2) and REPLICATE.to_dtensor() == Replicate()
    assert Placement.from_dtensor(Partial()).is_partial and Placement.from_dtensor(Shard(1)) == shard(1)


def test_axes_roles_and_groups_come_from_the_mesh() -> None:
    mesh = MeshSpec(shape=(2, 4), axes=("dp", "tp"))
    assert mesh.coords(6) == (1, 2) and mesh.rank_at((1, 2)) == 6
    assert mesh.group(6, ("tp",)) == (4, 5, 6, 7) and mesh.group(6, ("dp",)) == (2, 6)
    assert mesh.group(6, ("dp", "tp")) == tuple(range(8)) and mesh.index_in(6, ("dp",)) == 1
    plan = _plan()
    assert plan.data_parallel_axes == ("dp",) and plan.model_axes == () and plan.dp_degree == 16
    with pytest.raises(ValueError, match="precision compute_dtype"):
        PrecisionPolicy(compute_dtype="int8")


def test_prediction_overlap_and_lookup() -> None:
    plan = _plan()
    assert plan.predicted is not None and plan.predicted.overlap == pytest.approx(0.5)
    assert plan.program_of(15).ranks[-1] == 15
    with pytest.raises(KeyError):
        plan.program_of(16)


def test_mesh_validation() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        MeshSpec(shape=(2, 2), axes=("dp",))
    with pytest.raises(ValueError, match="unique"):
        MeshSpec(shape=(2, 2), axes=("dp", "dp"))
    assert MeshSpec(shape=(2, 4), axes=("dp_replicate", "dp_shard")).axis_size("dp_shard") == 4


def test_save_is_atomic_and_load_checks(tmp_path: Path) -> None:
    path = save_plan(_plan(), tmp_path / "sub" / "plan.json")
    assert load_plan(path) == _plan()
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]
    with pytest.raises(PlaitError, match="does not exist"):
        load_plan(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text('{"version": 2, "mesh": 3}')
    with pytest.raises(PlaitError, match="not a valid plait plan"):
        load_plan(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(PlaitError, match="JSON object"):
        load_plan(tmp_path / "list.json")
    (tmp_path / "old.json").write_text('{"version": 1, "data_parallel": {"kind": "replicate"}}')
    with pytest.raises(PlaitError, match="format 1, written by an older plait.*Re-run `plait plan"):
        load_plan(tmp_path / "old.json")
    (tmp_path / "new.json").write_text('{"version": 9}')
    with pytest.raises(PlaitError, match="version 9 is not supported"):
        load_plan(tmp_path / "new.json")


def test_table_mentions_the_choice() -> None:
    text = plan_text(_plan())
    assert "replicate" in text and "dp=16" in text and "dgx-a100:2" in text
