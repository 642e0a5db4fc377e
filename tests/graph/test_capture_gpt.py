"""capture() on plait's GPT and on Hugging Face GPT-2: analytic FLOPs, parameters, layers, op graph."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from torch import nn

from plait.graph import ModelGraph, capture
from plait.models import GPTConfig, zoo_model
from plait.models.gpt import GPT, lm_batch, lm_loss

CFG = GPTConfig(vocab_size=96, seq_len=32, num_layers=3, num_heads=4, hidden=64)
B = 2


def _gpt(cfg: GPTConfig = CFG) -> nn.Module:
    with torch.device("meta"):
        return GPT(cfg)


@pytest.fixture(scope="module")
def gpt_graph() -> ModelGraph:
    return capture(_gpt(), lm_batch(CFG, B, device="meta"), loss_fn=lm_loss, name="gpt")


def _block_fwd(cfg: GPTConfig, b: int) -> tuple[int, int]:
    """(matmul, attention) forward FLOPs of one block; attention counts the full T x T (no causal discount)."""
    tokens = b * cfg.seq_len
    return 2 * tokens * 12 * cfg.hidden**2, 4 * b * cfg.seq_len**2 * cfg.hidden


def test_layer_names_kinds_and_boundaries(gpt_graph: ModelGraph) -> None:
    names = [layer.name for layer in gpt_graph.layers]
    assert names == ["embed", "blocks.0", "blocks.1", "blocks.2", "head"]
    model = _gpt()
    for layer in gpt_graph.layers:
        assert type(model.get_submodule(layer.name)).__name__ == layer.kind
    shapes = [layer.output_shape for layer in gpt_graph.layers]
    assert shapes == [(B, 32, 64)] * 4 + [(B, 32, 96)]
    assert gpt_graph.layers[2].output_bytes == B * 32 * 64 * 4


def test_params_match_config(gpt_graph: ModelGraph) -> None:
    h, v, t = CFG.hidden, CFG.vocab_size, CFG.seq_len
    assert gpt_graph.num_params == CFG.num_params
    assert gpt_graph.param_bytes == 4 * CFG.num_params
    assert [layer.num_params for layer in gpt_graph.layers] == [v * h + t * h] + [12 * h * h + 13 * h] * 3 + [
        2 * h + v * h
    ]
    assert sum(layer.param_bytes for layer in gpt_graph.layers) == gpt_graph.param_bytes


def test_forward_flops_match_analytic(gpt_graph: ModelGraph) -> None:
    matmul, attn = _block_fwd(CFG, B)
    head = 2 * B * CFG.seq_len * CFG.hidden * CFG.vocab_size
    assert [layer.fwd_flops for layer in gpt_graph.layers] == [0] + [matmul + attn] * 3 + [head]
    # The usual estimate: 2 * (non-embedding parameters) * tokens, plus the attention term.
    dense = CFG.num_layers * 12 * CFG.hidden**2 + CFG.vocab_size * CFG.hidden
    assert gpt_graph.fwd_flops == 2 * dense * B * CFG.seq_len + CFG.num_layers * attn


def test_backward_flops(gpt_graph: ModelGraph) -> None:
    # Weight and input gradients of each matmul (2x); torch's attention backward formula counts 2.5x
    # the forward (it recomputes the scores). Embeddings do no matmuls.
    matmul, attn = _block_fwd(CFG, B)
    expected_block = 2 * matmul + 5 * attn // 2
    assert [layer.bwd_flops for layer in gpt_graph.layers] == [0] + [expected_block] * 3 + [
        2 * gpt_graph.layers[-1].fwd_flops
    ]


def test_flops_scale_with_batch(gpt_graph: ModelGraph) -> None:
    bigger = capture(_gpt(), lm_batch(CFG, 3 * B, device="meta"), loss_fn=lm_loss, with_ops=False)
    assert bigger.batch_size == 3 * B
    assert bigger.fwd_flops == 3 * gpt_graph.fwd_flops and bigger.bwd_flops == 3 * gpt_graph.bwd_flops
    # Activations scale too, except what does not depend on the batch: the position ids the embedding
    # keeps (seq_len int64) and the cross-entropy's total weight (one fp32 scalar).
    fixed = CFG.seq_len * 8 + 4
    assert bigger.activation_bytes - fixed == 3 * (gpt_graph.activation_bytes - fixed)


def test_block_activation_bytes(gpt_graph: ModelGraph) -> None:
    # Per block, in elements of B*T*h: LN1 input, QKV input, q/k/v (one 3h storage), attention output,
    # LN2 input, FC1 input, GELU input (4h) and FC2 input (4h) = 16; plus LN mean/rstd (2 x 2 x B*T) and the
    # attention log-sum-exp (B x heads x T).
    bth = B * CFG.seq_len * CFG.hidden
    expected = 4 * (16 * bth + 4 * B * CFG.seq_len + B * CFG.num_heads * CFG.seq_len)
    assert [layer.activation_bytes for layer in gpt_graph.layers[1:4]] == [expected] * 3


def test_op_flops_add_up_to_layer_flops(gpt_graph: ModelGraph) -> None:
    by_layer: dict[int, int] = defaultdict(int)
    for op in gpt_graph.ops:
        by_layer[op.layer] += op.flops
    assert [by_layer[layer.index] for layer in gpt_graph.layers] == [
        layer.fwd_flops for layer in gpt_graph.layers
    ]
    targets = {op.target for op in gpt_graph.ops}
    assert {
        "aten.linear.default",
        "aten.scaled_dot_product_attention.default",
        "aten.layer_norm.default",
    } <= targets
    sdpa = next(op for op in gpt_graph.ops if op.target == "aten.scaled_dot_product_attention.default")
    assert sdpa.module == "blocks.0.attn" and sdpa.layer == 1
    assert sdpa.inputs[0].shape == (B, CFG.num_heads, CFG.seq_len, CFG.hidden // CFG.num_heads)
    names = {op.name for op in gpt_graph.ops}
    params = {p.name for p in gpt_graph.params}
    for op in gpt_graph.ops:
        assert all(src in names or src in params or src.startswith("batch") for src in op.input_nodes)


def test_real_gpt_forward_agrees_with_capture() -> None:
    """Boundary shapes equal what a real forward produces."""
    torch.manual_seed(0)
    model = GPT(CFG)
    tokens, _ = lm_batch(CFG, B)
    g = capture(model, tokens, with_ops=False)
    seen: list[tuple[int, ...]] = []
    hooks = [
        model.get_submodule(layer.name).register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
        for layer in g.layers
    ]
    model(tokens)
    for h in hooks:
        h.remove()
    assert seen == [layer.output_shape for layer in g.layers]


def test_hf_gpt2_captures_without_weights() -> None:
    pytest.importorskip("transformers")
    from plait.models.hf import HF_GPT2_CONFIGS

    z = zoo_model("hf-gpt2-tiny")
    cfg = HF_GPT2_CONFIGS["hf-gpt2-tiny"]
    with torch.device("meta"):
        model = z.build()
    g = capture(model, z.make_batch(B, device="meta"), loss_fn=z.loss, name="hf-gpt2-tiny")
    assert g.num_params == cfg.num_params == sum(p.numel() for p in model.parameters())
    names = [layer.name for layer in g.layers]
    blocks = [f"transformer.h.{i}" for i in range(cfg.n_layer)]
    assert names == ["transformer.wte", "transformer.wpe", *blocks, "transformer.ln_f", "lm_head"]
    for layer in g.layers:
        model.get_submodule(layer.name)
    # lm_head.weight is tied to wte.weight: owned (and counted) once, by the embedding that uses it first.
    assert g.layers[0].num_params == cfg.vocab_size * cfg.n_embd and g.layers[-1].num_params == 0
    h, t = cfg.n_embd, cfg.n_positions
    attn = 4 * B * t * t * h
    assert [g.layers[2 + i].fwd_flops for i in range(cfg.n_layer)] == [
        2 * B * t * 12 * h * h + attn
    ] * cfg.n_layer
    assert g.layers[-1].fwd_flops == 2 * B * t * h * cfg.vocab_size
    assert g.layers[-1].output_shape == (B, t, cfg.vocab_size)
    by_layer: dict[int, int] = defaultdict(int)
    for op in g.ops:
        by_layer[op.layer] += op.flops
    assert [by_layer[layer.index] for layer in g.layers] == [layer.fwd_flops for layer in g.layers]


def test_hf_gpt2_small_param_count() -> None:
    pytest.importorskip("transformers")
    from plait.models.hf import HF_GPT2_CONFIGS

    z = zoo_model("hf-gpt2")
    with torch.device("meta"):
        model = z.build()
    g = capture(model, z.make_batch(1, device="meta"), loss_fn=z.loss, with_ops=False)
    assert g.num_params == HF_GPT2_CONFIGS["hf-gpt2"].num_params == 124_439_808  # GPT-2 small
    assert len(g.layers) == 12 + 4
