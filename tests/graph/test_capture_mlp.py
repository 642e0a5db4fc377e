"""capture() on MLPs: FLOPs, activation bytes and boundaries against hand counts."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from torch import nn

from plait.graph import ModelGraph, capture
from plait.models import MLP, MLPConfig, mse_loss

CFG = MLPConfig(in_dim=16, hidden=32, num_layers=3, out_dim=8)
B = 4


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    with torch.device("meta"):
        return MLP(CFG).to(dtype)


def _x(requires_grad: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(B, CFG.in_dim, device="meta", dtype=dtype, requires_grad=requires_grad)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(B, CFG.in_dim, device="meta"), torch.empty(B, CFG.out_dim, device="meta")


def _matmul(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def test_layer_names_and_boundaries() -> None:
    g = capture(_mlp(), _x())
    assert [layer.name for layer in g.layers] == ["layers.0", "layers.1", "layers.2", "out"]
    assert [layer.kind for layer in g.layers] == ["DenseLayer", "DenseLayer", "DenseLayer", "Linear"]
    assert [layer.output_shape for layer in g.layers] == [(B, 32), (B, 32), (B, 32), (B, 8)]
    assert [layer.output_bytes for layer in g.layers] == [B * 32 * 4] * 3 + [B * 8 * 4]
    assert g.batch_size == B and g.input_shapes == ((B, CFG.in_dim),) and g.dtype == "fp32"


def test_forward_flops_are_2mkn_per_layer() -> None:
    g = capture(_mlp(), _x())
    dims = [CFG.in_dim, 32, 32, 32, CFG.out_dim]
    expected = [_matmul(B, a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)]
    assert [layer.fwd_flops for layer in g.layers] == expected


def test_backward_flops_skip_the_input_grad_nobody_needs() -> None:
    # FlopCounterMode counts the matmuls autograd runs: the weight gradient always, the input gradient
    # only where the input requires grad. The batch does not, so layers.0 has only its weight gradient.
    g = capture(_mlp(), _x())
    fwd = [layer.fwd_flops for layer in g.layers]
    assert [layer.bwd_flops for layer in g.layers] == [fwd[0]] + [2 * f for f in fwd[1:]]
    g_in = capture(_mlp(), _x(requires_grad=True))
    assert [layer.bwd_flops for layer in g_in.layers] == [2 * f for f in fwd]


def test_activation_bytes_match_a_hand_count() -> None:
    f = 4  # fp32
    # layers.0: Linear saves its input (B x in), GELU saves its input (B x h).
    # layers.i: Linear input (previous GELU output) and GELU input, B x h each.
    # out: its input (B x h); with MSE the loss also keeps the prediction and the target (B x out each).
    hand = [B * 16 * f + B * 32 * f, 2 * B * 32 * f, 2 * B * 32 * f, B * 32 * f]
    g_sum = capture(_mlp(), _x())
    assert [layer.activation_bytes for layer in g_sum.layers] == hand
    g_mse = capture(_mlp(), _batch(), loss_fn=mse_loss)
    assert [layer.activation_bytes for layer in g_mse.layers] == hand[:3] + [hand[3] + 2 * B * 8 * f]


def test_params_and_bytes() -> None:
    g = capture(_mlp(), _x())
    assert g.num_params == sum(p.numel() for p in _mlp().parameters())
    assert g.param_bytes == 4 * g.num_params
    assert [layer.num_params for layer in g.layers] == [16 * 32 + 32, 32 * 32 + 32, 32 * 32 + 32, 32 * 8 + 8]
    for p in g.params:
        assert p.name.startswith(g.layers[p.layer].name + ".")


def test_bf16_dtype_and_bytes() -> None:
    g = capture(_mlp(torch.bfloat16), _x(dtype=torch.bfloat16))
    assert g.dtype == "bf16"
    assert g.param_bytes == 2 * g.num_params
    assert g.layers[1].output_bytes == B * 32 * 2


def test_costs_scale_linearly_with_batch() -> None:
    small = capture(_mlp(), torch.empty(2, CFG.in_dim, device="meta"))
    large = capture(_mlp(), torch.empty(6, CFG.in_dim, device="meta"))
    assert large.batch_size == 3 * small.batch_size
    for a, b in zip(small.layers, large.layers, strict=True):
        assert (b.fwd_flops, b.bwd_flops, b.activation_bytes, b.output_bytes) == (
            3 * a.fwd_flops,
            3 * a.bwd_flops,
            3 * a.activation_bytes,
            3 * a.output_bytes,
        )


def test_kernels_and_bytes_moved() -> None:
    g = capture(_mlp(), _x())
    f = 4
    # layers.1 runs addmm(bias, x, W^T) and gelu; the transpose is a view (no kernel, no traffic).
    addmm = (32 + B * 32 + 32 * 32 + B * 32) * f
    gelu = 2 * B * 32 * f
    assert g.layers[1].num_kernels == 2
    assert g.layers[1].fwd_bytes_moved == addmm + gelu


def _op_flops_by_layer(g: ModelGraph) -> dict[int, int]:
    out: dict[int, int] = defaultdict(int)
    for op in g.ops:
        out[op.layer] += op.flops
    return out


def test_op_graph_matches_layers() -> None:
    g = capture(_mlp(), _batch(), loss_fn=mse_loss)
    assert [op.target for op in g.ops if op.flops] == ["aten.linear.default"] * 4
    by_layer = _op_flops_by_layer(g)
    assert [by_layer[layer.index] for layer in g.layers] == [layer.fwd_flops for layer in g.layers]
    first = g.ops[0]
    assert first.module == "layers.0.fc" and first.layer == 0
    assert first.input_nodes[1:] == ("layers.0.fc.weight", "layers.0.fc.bias")
    assert first.outputs[0].shape == (B, 32)
    assert capture(_mlp(), _x(), with_ops=False).ops == ()


def test_sequential_activations_fold_into_the_previous_layer() -> None:
    with torch.device("meta"):
        seq = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    g = capture(seq, torch.empty(3, 8, device="meta"))
    assert [layer.name for layer in g.layers] == ["0", "2", "4"]
    # addmm + relu; the last layer's addmm + the sum that makes the loss (glue counts in the layer before)
    assert [layer.num_kernels for layer in g.layers] == [2, 2, 2]
    assert g.layers[0].output_shape == (3, 16)
    for layer in g.layers:
        seq.get_submodule(layer.name)


def test_single_module_is_one_layer() -> None:
    with torch.device("meta"):
        lin = nn.Linear(8, 4)
    g = capture(lin, torch.empty(5, 8, device="meta"))
    assert [layer.name for layer in g.layers] == [""]
    assert g.layers[0].fwd_flops == _matmul(5, 8, 4)
    assert lin.get_submodule(g.layers[0].name) is lin


@pytest.mark.parametrize("n", [1, 3])
def test_buffers_are_counted_not_as_activations(n: int) -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("scale", torch.ones(4))
            self.register_buffer("table", torch.zeros(n, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * self.scale

    g = capture(Scaled(), torch.empty(2, 4))
    assert g.buffer_bytes == 4 * 4 + n * 8 * 4
    # fc keeps its input; the multiply keeps only the buffer (the other factor needs no gradient).
    assert g.layers[0].activation_bytes == 2 * 4 * 4


def test_graph_round_trips_through_json() -> None:
    import json

    from plait.serde import from_dict, to_dict

    g = capture(_mlp(), _batch(), loss_fn=mse_loss, name="mlp")
    back = from_dict(ModelGraph, json.loads(json.dumps(to_dict(g))))
    assert back == g
    assert back.without_ops().ops == () and back.without_ops().layers == g.layers
