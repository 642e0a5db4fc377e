"""Each layer's backward workspace from capture: hand-computed on Linear layers and on plait's GPT, split
into the part that scales with the batch and the fresh parameter gradients that do not."""

from __future__ import annotations

import torch
from torch import nn

from plait.graph import LayerInfo, ModelGraph, capture
from plait.models import GPTConfig
from plait.models.gpt import GPT, lm_batch, lm_loss
from plait.serde import from_dict, to_dict

CFG = GPTConfig(vocab_size=96, seq_len=32, num_layers=2, num_heads=4, hidden=64)


def _gpt_graph(batch: int) -> ModelGraph:
    with torch.device("meta"):
        model = GPT(CFG)
    return capture(model, lm_batch(CFG, batch, device="meta"), loss_fn=lm_loss, with_ops=False)


def test_linear_layers_hold_their_input_gradient_and_fresh_parameter_gradients() -> None:
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    graph = capture(model, torch.randn(16, 8), with_ops=False)
    first, second = graph.layers
    # the last Linear makes its input's gradient (16 x 32) and its weight's and bias's (4 x 32 + 4) at once
    assert (second.bwd_workspace_bytes, second.bwd_param_grad_bytes) == (16 * 32 * 4, (4 * 32 + 4) * 4)
    # the ReLU's backward (glue of the first layer) makes a 16 x 32 gradient; the first Linear's input needs none
    assert (first.bwd_workspace_bytes, first.bwd_param_grad_bytes) == (16 * 32 * 4, (32 * 8 + 32) * 4)


def test_gpt_blocks_hold_two_mlp_hidden_gradients_and_the_head_the_loss_gradients() -> None:
    b, t, h, v = 4, CFG.seq_len, CFG.hidden, CFG.vocab_size
    layers = _gpt_graph(b).layers
    for block in layers[1:-1]:
        assert block.bwd_workspace_bytes == 2 * b * t * 4 * h * 4  # the 4h-wide gradient before and after GELU
        assert block.bwd_param_grad_bytes == (4 * h * h + 4 * h) * 4  # fc1's weight and bias gradients
    head = layers[-1]
    assert head.bwd_workspace_bytes == 2 * b * t * v * 4  # the loss's gradients of the log-softmax and the logits
    assert head.bwd_param_grad_bytes == v * h * 4


def test_workspace_scales_with_the_batch_and_parameter_gradients_do_not() -> None:
    small, large = _gpt_graph(2).layers, _gpt_graph(6).layers
    # (the embedding's workspace is the position embedding's gradient, summed over the batch: it does not scale;
    # plait scales every per-layer size linearly, as it does activation_bytes)
    assert small[0].bwd_workspace_bytes == large[0].bwd_workspace_bytes == CFG.seq_len * CFG.hidden * 4
    for s, big in zip(small[1:], large[1:], strict=True):
        assert big.bwd_workspace_bytes == 3 * s.bwd_workspace_bytes, s.name
        assert big.bwd_param_grad_bytes == s.bwd_param_grad_bytes, s.name


def test_capture_leaves_the_model_without_gradients() -> None:
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    capture(model, torch.randn(16, 8), with_ops=False)
    assert all(p.grad is None for p in model.parameters())


def test_workspace_fields_round_trip_and_default_to_zero() -> None:
    layer = _gpt_graph(2).layers[1]
    assert from_dict(LayerInfo, to_dict(layer)) == layer
    old = {k: v for k, v in to_dict(layer).items() if not k.startswith("bwd_workspace") and k != "bwd_param_grad_bytes"}
    restored = from_dict(LayerInfo, old)
    assert (restored.bwd_workspace_bytes, restored.bwd_param_grad_bytes) == (0, 0)
