"""capture_joint(): the joint forward+backward ATen graph with modules, layers, FLOPs and repeated layers."""

from __future__ import annotations

import dataclasses
import json
import operator
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from plait.errors import CaptureError
from plait.graph import JointGraph, JointNode, JointRef, ModelGraph, capture, capture_joint
from plait.models import GPT_CONFIGS, zoo_model
from plait.serde import from_dict, to_dict

aten = torch.ops.aten
Captured = tuple[str, nn.Module, ModelGraph]
ZOO = ["gpt-tiny", "gpt-mini", "mlp-tiny", "transformer-tiny", "hf-gpt2-tiny", "hf-llama-tiny"]
# The stacks of identical layers each model must show as one repeated group.
STACKS = {
    "gpt-tiny": "blocks.",
    "gpt-mini": "blocks.",
    "hf-gpt2-tiny": "transformer.h.",
    "hf-llama-tiny": "model.layers.",
}


def _build(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...], Any]:
    if name.startswith("hf-"):
        pytest.importorskip("transformers")
    z = zoo_model(name)
    with torch.device("meta"):
        model = z.build()
    return model, z.make_batch(2, device="meta"), z.loss


@pytest.fixture(scope="module", params=ZOO)
def captured(request: pytest.FixtureRequest) -> Captured:
    model, batch, loss = _build(request.param)
    graph = capture(model, batch, loss_fn=loss, name=request.param, with_ops=False, with_joint=True)
    return request.param, model, graph


def _joint(graph: ModelGraph) -> JointGraph:
    assert graph.joint is not None
    return graph.joint


def _weight_grad_op(jg: JointGraph, fqn: str) -> JointNode:
    """The op computing a parameter's gradient, looking through the views (``t``, ``view``) after it."""
    node = jg.nodes[jg.grads[fqn]]
    while node.target is not None and node.target.is_view:
        node = jg.nodes[node.refs[0]]
    return node


def test_nodes_are_sane(captured: Captured) -> None:
    _, model, graph = captured
    jg = _joint(graph)
    num_params = sum(1 for _ in model.parameters())
    calls = [n for n in jg.nodes if n.kind == "call"]
    assert 3 * num_params < len(calls) < 200 * num_params
    assert [n.index for n in jg.nodes] == list(range(len(jg)))
    assert jg.nodes[-1].kind == "output"
    for n in jg.nodes:
        assert all(r < n.index for r in n.refs)  # topological order
        assert 0 <= n.layer < len(jg.layer_names)
        assert n.phase in ("fwd", "bwd")
        assert not n.saved or n.phase == "fwd"
    for n in calls:
        assert n.target is operator.getitem or isinstance(n.target, torch._ops.OpOverload)
        assert n.target not in (aten.linear.default, aten.layer_norm.default)  # decomposed, as DTensor sees
    phases = [n.phase for n in calls]
    assert phases == sorted(phases, key=lambda p: p == "bwd")  # forward first, then backward
    assert jg.loss in jg.nodes[-1].refs and jg.nodes[jg.loss].outputs[0].shape == ()
    assert jg.layer_names == tuple(layer.name for layer in graph.layers)


def test_every_parameter_has_a_placeholder_and_a_gradient(captured: Captured) -> None:
    _, model, graph = captured
    jg = _joint(graph)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert set(jg.params) == set(shapes) == set(jg.grads)
    for fqn, shape in shapes.items():
        holder, grad = jg.nodes[jg.params[fqn]], jg.nodes[jg.grads[fqn]]
        assert (holder.kind, holder.param, holder.outputs[0].shape) == ("param", fqn, shape)
        assert (grad.grad_of, grad.phase, grad.outputs[0].shape) == (fqn, "bwd", shape)
    # Parameters belong to the layer capture() gives them (the first layer that uses them).
    assert {p.name: p.layer for p in graph.params} == {f: jg.nodes[i].layer for f, i in jg.params.items()}
    assert all(jg.nodes[i].kind == "input" for i in jg.inputs) and jg.inputs


def test_flops_agree_with_capture(captured: Captured) -> None:
    _, _, graph = captured
    jg = _joint(graph)
    assert [jg.flops("fwd", k) for k in range(len(jg.layer_names))] == [x.fwd_flops for x in graph.layers]
    assert jg.flops("bwd") == graph.bwd_flops
    assert [jg.flops("bwd", k) for k in range(len(jg.layer_names))] == [x.bwd_flops for x in graph.layers]


def test_repeated_layers(captured: Captured) -> None:
    name, _, graph = captured
    jg = _joint(graph)
    rep = jg.repeats
    assert sorted(k for g in rep.groups for k in g) == list(range(len(jg.layer_names)))
    if name in STACKS:
        stack = tuple(k for k, n in enumerate(jg.layer_names) if n.startswith(STACKS[name]))
        assert stack in rep.groups and len(stack) >= 2
        assert all(len(g) == 1 for g in rep.groups if g != stack)  # embedding, head, ... are singletons
    outside = ("input", "constant", "output")
    for group in rep.groups:
        first = [n for n in jg.nodes_of_layer(group[0]) if n.kind not in outside]
        for k in group:
            mine = [n for n in jg.nodes_of_layer(k) if n.kind not in outside]
            assert len(mine) == len(first)
            for a, b in zip(first, mine, strict=True):
                assert jg.representative(b.index) == a.index
                assert (a.target, a.phase, a.outputs) == (b.target, b.phase, b.outputs)
    for fqn, to in rep.params.items():
        assert jg.nodes[jg.params[fqn]].outputs == jg.nodes[jg.params[to]].outputs


def test_gpt_backward_attribution() -> None:
    model, batch, loss = _build("gpt-tiny")
    jg = capture_joint(model, batch, loss_fn=loss)
    block1 = jg.layer_names.index("blocks.1")
    mm = _weight_grad_op(jg, "blocks.1.mlp.fc2.weight")
    assert (mm.target, mm.module, mm.phase, mm.layer) == (aten.mm.default, "blocks.1.mlp.fc2", "bwd", block1)
    assert mm.flops == 2 * 2 * 64 * 256 * 64  # batch 2 x seq 64 tokens, 256 x 64 weight

    def modules(target: Any, phase: str) -> list[str]:
        return [n.module for n in jg.nodes if n.target == target and n.phase == phase]

    norms = ["blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1", "blocks.1.ln2", "head.ln"]
    assert modules(aten.native_layer_norm.default, "fwd") == norms
    assert modules(aten.native_layer_norm_backward.default, "bwd") == norms[::-1]
    attention = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    assert modules(attention, "bwd") == ["blocks.1.attn", "blocks.0.attn"]
    assert [jg.nodes[i].module for i in (jg.grads["embed.tok.weight"], jg.grads["embed.pos.weight"])] == [
        "embed.tok",
        "embed.pos",
    ]
    # The loss and its backward are glue: they belong to the last layer.
    (nll,) = (n for n in jg.nodes if n.target == aten.nll_loss_backward.default)
    assert (nll.module, nll.layer, jg.nodes[jg.loss].layer) == ("", 3, 3)


def test_args_keep_what_sharding_rules_need() -> None:
    model, batch, loss = _build("gpt-tiny")
    jg = capture_joint(model, batch, loss_fn=loss)
    (split, *_) = (n for n in jg.nodes if n.target == aten.split.Tensor)
    assert isinstance(split.args[0], JointRef) and split.args[1:] == (32, 3)  # head size, dim
    views = [n for n in jg.nodes if n.target == aten.view.default and n.module == "blocks.0.attn"]
    assert views[0].args[1] == [2, 64, 2, 96] and isinstance(views[0].args[1], list)
    mm = _weight_grad_op(jg, "blocks.0.attn.qkv.weight")
    assert [jg.nodes[r].outputs[0].shape for r in mm.refs] == [(192, 128), (128, 64)]
    assert set(jg.consumers(mm.index)) == {jg.nodes[u].index for u in jg.users[mm.index]}
    # Forward values read by backward are marked; parameters are not.
    ln = next(n for n in jg.nodes if n.target == aten.native_layer_norm.default)
    stats = [n for n in jg.nodes if n.target is operator.getitem and n.refs == (ln.index,)]
    assert [n.saved for n in stats] == [False, True, True]  # backward reads a view of the output
    assert any(jg.nodes[u].saved for u in jg.consumers(stats[0].index))
    assert not any(jg.nodes[i].saved for i in jg.params.values())
    assert jg.nodes_of_layer(1, "bwd") and all(n.phase == "bwd" for n in jg.nodes_of_layer(1, "bwd"))


class Mixed(nn.Module):
    """A used, an unused and a frozen Linear, a buffer and integer ids."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.a = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.register_buffer("scale", torch.full((4,), 2.0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.a(self.frozen(self.emb(ids))) * self.scale


def test_frozen_unused_parameters_buffers_and_integer_inputs() -> None:
    model = Mixed()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    jg = capture_joint(model, torch.zeros(3, 5, dtype=torch.long))
    assert set(jg.params) == {n for n, _ in model.named_parameters()}
    assert set(jg.grads) == {"emb.weight", "a.weight", "a.bias"}
    assert jg.buffers == {"scale": jg.buffers["scale"]} and jg.nodes[jg.buffers["scale"]].kind == "buffer"
    assert jg.nodes[jg.inputs[0]].outputs[0].dtype == "int64"
    assert jg.nodes[jg.params["unused.weight"]].layer == jg.layer_names.index("unused")
    # The model is untouched: same values, same flags, no hooks left behind.
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert not model.frozen.weight.requires_grad and model.a.weight.requires_grad
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(isinstance(n.target, torch._ops.OpOverload) or n.kind != "call" for n in jg.nodes)


def test_inputs_requiring_grad_get_gradients_as_in_capture() -> None:
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    graph = capture(seq, torch.randn(2, 4, requires_grad=True), with_joint=True, with_ops=False)
    jg = _joint(graph)
    assert [jg.flops("bwd", k) for k in range(3)] == [x.bwd_flops for x in graph.layers]
    # Linear + ReLU twice, then a Linear alone: the batch input is outside every layer's structure.
    assert jg.layer_names == ("0", "2", "4") and jg.repeats.groups == ((0, 1), (2,))
    assert jg.repeats.params == {
        "0.weight": "0.weight",
        "0.bias": "0.bias",
        "2.weight": "0.weight",
        "2.bias": "0.bias",
        "4.weight": "4.weight",
        "4.bias": "4.bias",
    }


class BranchOnValue(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y if y.sum() > 0 else -y  # Python control flow on a tensor value


def test_untraceable_model_raises_capture_error() -> None:
    with pytest.raises(CaptureError, match=r"BranchOnValue.*reads a tensor value.*torch.where"):
        capture_joint(BranchOnValue(), torch.randn(2, 4))
    with pytest.raises(CaptureError, match="scalar"):
        capture_joint(nn.Linear(4, 4), torch.randn(2, 4), loss_fn=lambda m, b: m(*b))
    with pytest.raises(CaptureError, match="nn.Module"):
        capture_joint("not a model", torch.randn(2, 4))  # type: ignore[arg-type]


def test_joint_is_not_serialised_and_without_ops_drops_it(captured: Captured) -> None:
    _, _, graph = captured
    data = to_dict(graph)
    assert "joint" not in data
    json.dumps(data)
    assert from_dict(ModelGraph, data) == graph  # joint is excluded from comparison
    assert from_dict(ModelGraph, data).joint is None
    assert graph.without_ops().joint is None and graph.without_ops().layers == graph.layers
    assert "joint" not in repr(graph)


@dataclasses.dataclass(frozen=True)
class _WithHidden:
    shown: int
    hidden: object = dataclasses.field(default=None, metadata={"json": False})


def test_to_dict_skips_fields_marked_json_false() -> None:
    assert to_dict(_WithHidden(shown=1, hidden=object())) == {"shown": 1}
    assert from_dict(_WithHidden, {"shown": 1}) == _WithHidden(shown=1)


_BIG = textwrap.dedent(
    """
    import json, resource, time, torch
    from torch._subclasses.fake_tensor import FakeTensor
    from plait.graph import capture_joint
    from plait.models import zoo_model
    z = zoo_model("gpt3-13b")
    with torch.device("meta"):
        model = z.build()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.process_time()
    jg = capture_joint(model, z.make_batch(1, device="meta"), loss_fn=z.loss)
    vals = [n.meta.get("val") for n in jg.gm.graph.nodes if n.op == "placeholder"]
    print(json.dumps({
        "cpu_s": time.process_time() - t,
        "grew": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before,
        "numel": sum(jg.nodes[i].outputs[0].numel for i in jg.params.values()),
        "fake": all(isinstance(v, FakeTensor) for v in vals),
        "groups": [len(g) for g in jg.repeats.groups],
    }))
    """
)


def test_big_model_captures_on_fake_tensors() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _BIG], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    cfg = GPT_CONFIGS["gpt3-13b"]
    assert r["numel"] == cfg.num_params  # 13e9 parameters: 52 GB in fp32 if anything were real
    assert r["fake"] and r["grew"] < 1024**3, r
    assert r["groups"] == [1, cfg.num_layers, 1]
    assert r["cpu_s"] < 60, r


def test_fake_values_stay_fake() -> None:
    model, batch, loss = _build("gpt-tiny")
    jg = capture_joint(model, batch, loss_fn=loss)
    assert jg.gm is not None
    assert all(isinstance(n.meta["val"], FakeTensor) for n in jg.gm.graph.nodes if n.op == "placeholder")
