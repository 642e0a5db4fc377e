"""The layer view rule and parameter ownership (tied, root-level and unused parameters)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from plait.graph import capture
from plait.graph.layers import candidate_layers


class TiedLM(nn.Module):
    """Embedding and output projection share one weight; a root-level scale is used after block 0."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.scale = nn.Parameter(torch.ones(8))
        self.unused = nn.Linear(3, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        x = self.blocks[0](x) * self.scale
        x = self.blocks[1](x)
        return F.linear(x, self.emb.weight)


class Trunk(nn.Module):
    """A wrapper whose child holds the repeated blocks (like Hugging Face's ``transformer.h``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Module()
        self.body.inp = nn.Linear(4, 6)
        self.body.layers = nn.ModuleList(nn.Linear(6, 6) for _ in range(3))
        self.body.drop = nn.Dropout(0.0)
        self.top = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body.drop(self.body.inp(x))
        for layer in self.body.layers:
            x = layer(x)
        return self.top(x)


def test_tied_root_and_unused_parameters_each_belong_to_one_layer() -> None:
    with torch.device("meta"):
        model = TiedLM()
    g = capture(model, torch.empty(2, 5, dtype=torch.long, device="meta"))
    assert [layer.name for layer in g.layers] == ["emb", "blocks.0", "blocks.1", "unused"]
    owner = {p.name: g.layers[p.layer].name for p in g.params}
    assert owner == {
        "emb.weight": "emb",
        "blocks.0.weight": "blocks.0",
        "blocks.0.bias": "blocks.0",
        "scale": "blocks.0",  # a root parameter: the layer running when it is first used
        "blocks.1.weight": "blocks.1",
        "blocks.1.bias": "blocks.1",
        "unused.weight": "unused",  # never called: its own layer, after the called ones, with no FLOPs
        "unused.bias": "unused",
    }
    assert g.num_params == sum(p.numel() for p in model.parameters())
    assert g.layers[-1].fwd_flops == 0
    # The tied output projection (glue after blocks.1) counts in blocks.1: 2 * (2*5) * 8 * 50.
    assert g.layers[2].fwd_flops == 2 * 10 * 8 * 8 + 2 * 10 * 8 * 50


def test_trunk_is_expanded_and_parameterless_children_fold() -> None:
    with torch.device("meta"):
        model = Trunk()
    names = [n for n, _ in candidate_layers(model)]
    assert names == ["body.inp", "body.layers.0", "body.layers.1", "body.layers.2", "top"]
    g = capture(model, torch.empty(3, 4, device="meta"))
    assert [layer.name for layer in g.layers] == names
    assert g.layers[0].output_shape == (3, 6)


def test_layers_follow_call_order_not_definition_order() -> None:
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.second = nn.Linear(6, 2)
            self.first = nn.Linear(4, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.second(self.first(x))

    g = capture(Reversed(), torch.empty(3, 4))
    assert [layer.name for layer in g.layers] == ["first", "second"]
    assert [p.layer for p in g.params] == [1, 1, 0, 0]  # second.*, first.* in definition order


def test_shared_module_called_twice_counts_both_calls() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 4)
            self.shared = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.shared(self.shared(self.inp(x)))

    g = capture(Twice(), torch.empty(3, 4))
    assert [layer.name for layer in g.layers] == ["inp", "shared"]
    assert g.layers[1].fwd_flops == 2 * (2 * 3 * 4 * 4)
    assert g.layers[1].output_shape == (3, 4)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 32)
        self.b = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(torch.relu(self.a(x)))


class _Checkpointed(nn.Module):
    def __init__(self, recompute: bool) -> None:
        super().__init__()
        self.recompute = recompute
        self.blocks = nn.ModuleList(_Block() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.recompute else block(x)
        return x


def test_activation_checkpointing_keeps_only_block_inputs_and_recomputes() -> None:
    x = torch.empty(4, 8)
    plain = capture(_Checkpointed(False), x)
    ckpt = capture(_Checkpointed(True), x)
    # Each checkpointed block keeps only its (4 x 8 fp32) input; everything else is recomputed in backward.
    assert ckpt.activation_bytes == 2 * 4 * 8 * 4 < plain.activation_bytes
    assert ckpt.fwd_flops == plain.fwd_flops
    for a, b in zip(plain.layers, ckpt.layers, strict=True):
        assert b.bwd_flops > a.bwd_flops  # the recomputed forward runs during backward
