"""SyncSpec fields (JSON, validation, table) and the single-process parts of runtime.sync: shard placement and
the checks ``build_model_sync`` makes before it talks to any peer."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from plait.errors import PlaitError
from plait.plan import SyncSpec, plan_from_json, plan_text, plan_to_json
from plait.plan.ir import ParamPlan
from plait.runtime.sync import merge_counts
from plait.runtime.sync.compose import plan_synchronizers
from plait.runtime.sync.counter import ByteCounter
from plait.runtime.sync.ps_layout import server_layouts, shard_of

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "mlp-small@local-pinned-4.json"


def golden_raw() -> dict[str, Any]:
    """A plan JSON written before the new SyncSpec fields (the golden file, its volatile provenance put back)."""
    raw: dict[str, Any] = json.loads(GOLDEN.read_text())
    raw["provenance"].update(created="", search_s=0.0)
    return raw


def test_old_plans_load_and_write_the_same_json() -> None:
    raw = golden_raw()
    plan = plan_from_json(json.dumps(raw))
    assert all(p.sync == SyncSpec(kind="allreduce", axes=("dp",), bucket=p.sync.bucket) for p in plan.params)
    again = json.loads(plan_to_json(plan))
    assert [p["sync"] for p in again["params"]] == [p["sync"] for p in raw["params"]]


def test_new_fields_round_trip_and_show_in_the_table() -> None:
    plan = plan_from_json(json.dumps(golden_raw()))
    specs = [
        SyncSpec(kind="ps", axes=("dp",), num_shards=2, shard_dim=1, servers=(0, 3), staleness=2),
        SyncSpec(kind="sfb", axes=("dp",)),
        SyncSpec(kind="allreduce", axes=("dp",), bucket=0, compress="powersgd", compress_rank=4, error_feedback=False),
        SyncSpec(kind="allreduce", axes=("dp",), bucket=1, compress="bf16"),
    ]
    params = tuple(replace(p, sync=specs[i % len(specs)]) for i, p in enumerate(plan.params))
    mixed = replace(plan, params=params)
    text = plan_to_json(mixed)
    assert plan_from_json(text) == mixed
    first = json.loads(text)["params"][0]["sync"]
    assert first == {"kind": "ps", "axes": ["dp"], "bucket": None, "compress": None, "staleness": 2,
                     "num_shards": 2, "shard_dim": 1, "servers": [0, 3]}
    table = plan_text(mixed, width=250)
    assert "parameter server over dp, 2 shards on dim 1 (ranks 0,3), staleness 2" in table
    assert "SFB over dp" in table and "PowerSGD rank 4 without error feedback" in table and "bf16 compressed" in table


@pytest.mark.parametrize(("fields", "field"), [
    ({"kind": "gossip"}, "kind"),
    ({"kind": "allreduce", "staleness": 1}, "staleness"),
    ({"kind": "ps", "staleness": -1}, "staleness"),
    ({"kind": "allreduce", "compress": "zip"}, "compress"),
    ({"kind": "ps", "compress": "fp16"}, "compress"),
    ({"kind": "allreduce", "compress": "powersgd", "compress_rank": 0}, "compress_rank"),
    ({"kind": "allreduce", "compress": "fp16", "compress_rank": 2}, "compress_rank"),
    ({"kind": "ps", "num_shards": 0}, "num_shards"),
    ({"kind": "allreduce", "num_shards": 2}, "num_shards"),
    ({"kind": "ps", "shard_dim": -1}, "shard_dim"),
    ({"kind": "ps", "num_shards": 2, "servers": (1,)}, "servers"),
    ({"kind": "ps", "servers": (-1,)}, "servers"),
    ({"kind": "allreduce", "bucket": -2}, "bucket"),
    ({"kind": "allreduce", "axes": ("dp", "dp")}, "axes"),
])
def test_bad_specs_name_the_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(PlaitError, match=rf"SyncSpec\.{field}\b"):
        SyncSpec(**fields)  # type: ignore[arg-type]


def test_a_bad_spec_in_a_plan_file_names_its_place() -> None:
    raw = golden_raw()
    raw["params"][0]["sync"]["compress"] = "zip"
    with pytest.raises(ValueError, match=r"params\[0\]\.sync\.compress"):
        plan_from_json(json.dumps(raw))
    raw["params"][0]["sync"].update(compress=None, kind="ps", staleness=-3)
    with pytest.raises(PlaitError, match="SyncSpec.staleness -3"):
        plan_from_json(json.dumps(raw))


def test_shard_layout_explicit_uneven_and_round_robin() -> None:
    shapes = {"a": (8, 4), "b": (5, 6), "c": (3,)}
    specs = {"a": SyncSpec(kind="ps", num_shards=2, servers=(2, 0)),
             "b": SyncSpec(kind="ps", num_shards=4, shard_dim=1),
             "c": SyncSpec(kind="ps")}
    layouts = server_layouts(list(shapes), specs, 4)
    # b is the 2nd parameter (j = 1): shard i on (1 + i) % 4; c (j = 2) on 2
    assert layouts == {0: [("a", 1), ("b", 3)], 1: [("b", 0)], 2: [("a", 0), ("b", 1), ("c", 0)], 3: [("b", 2)]}
    b = torch.arange(30.0).view(5, 6)
    assert [shard_of(b, specs["b"], i).shape[1] for i in range(4)] == [2, 2, 1, 1]  # tensor_split: first ones longer


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)


def _specs(**kinds: str) -> dict[str, SyncSpec]:
    base = {n: SyncSpec(kind="allreduce") for n, _ in TwoLayers().named_parameters()}
    base.update({n.replace("_", "."): SyncSpec(kind=k) for n, k in kinds.items()})  # type: ignore[arg-type]
    return base


def test_synchronizers_group_by_kind_and_options() -> None:
    specs = _specs(fc_weight="sfb", fc_bias="sfb")
    specs["norm.bias"] = SyncSpec(kind="allreduce", compress="fp16")
    groups = plan_synchronizers(TwoLayers(), specs)
    assert groups == {("sfb",): ["fc.weight", "fc.bias"], ("allreduce", None, 1, True): ["norm.weight"],
                      ("allreduce", "fp16", 1, True): ["norm.bias"]}


@pytest.mark.parametrize(("specs", "message"), [
    ({"fc.weight": SyncSpec(kind="allreduce")}, "no SyncSpec for parameters"),
    ({**_specs(), "extra.weight": SyncSpec(kind="allreduce")}, "does not train"),
    (_specs(fc_weight="reduce_scatter"), "FSDP2"),
    (_specs(norm_weight="sfb"), "nn.Linear"),
    (_specs(fc_bias="sfb"), "give 'fc.weight' kind 'sfb' too"),
    ({**_specs(), "fc.bias": SyncSpec(kind="allreduce", axes=("dp",))}, "different mesh axes"),
])
def test_build_refuses_what_it_cannot_run(specs: dict[str, SyncSpec], message: str) -> None:
    with pytest.raises(PlaitError, match=message):
        plan_synchronizers(TwoLayers(), specs)


def test_parameter_server_needs_an_optimizer() -> None:
    with pytest.raises(PlaitError, match="optimizer_fn"):
        plan_synchronizers(TwoLayers(), _specs(fc_weight="ps"), has_optimizer=False)


def test_byte_counter_per_step_and_merged() -> None:
    counter = ByteCounter()
    counter.add(0, sent=10, recv=4)
    counter.add(2, sent=1)
    counter.add(0, recv=6)
    assert counter.step(0) == {"sent_bytes": 10, "recv_bytes": 10} and counter.step(1) == {"sent_bytes": 0, "recv_bytes": 0}
    assert counter.total() == {"sent_bytes": 11, "recv_bytes": 10} and counter.steps == [0, 2]
    merged = merge_counts({"ps-s0": counter.step(0), "sfb": {"sent_bytes": 5, "recv_bytes": 5}})
    assert merged == {"sync.sent_bytes": 15, "sync.recv_bytes": 15, "sync.ps-s0.sent_bytes": 10,
                      "sync.ps-s0.recv_bytes": 10, "sync.sfb.sent_bytes": 5, "sync.sfb.recv_bytes": 5}


def test_param_plan_keeps_its_sync() -> None:
    spec = SyncSpec(kind="ps", axes=("dp",), staleness=1)
    assert ParamPlan(name="w", placements=(), sync=spec).sync.staleness == 1
