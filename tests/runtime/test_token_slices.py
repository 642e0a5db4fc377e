"""Token-sliced execution in one process equals the unsliced model: loss and every parameter gradient, for the zoo
GPT (float64 to rounding, float32 to 1e-5), the zoo's causal layer stack, and Hugging Face GPT-2 and Llama; bad
slicings, bad orders and models that cannot be sliced are clear errors."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn

from plait.errors import PlaitError
from plait.models import zoo_model
from plait.runtime.token_slices import TokenSlicer, sliced_step
from plait.runtime.token_state import Cell, token_cells

Slicing = list[tuple[int, list[int]]]
F64_RTOL, F64_ATOL = 1e-12, 1e-14  # float64: the sliced sums differ from the unsliced ones by rounding only
F32_RTOL, F32_ATOL = 1e-5, 1e-6

# gpt-tiny: 64 tokens; batches of 4 sequences
GPT_SLICINGS: list[Slicing] = [
    [(4, [64])],  # one slice: the unsliced model
    [(4, [16, 16, 16, 16])],
    [(4, [10, 30, 1, 23])],  # uneven, with a one-token slice
    [(1, [64]), (3, [5, 59])],  # micro-batches of different sizes and slicings
    [(2, [1] * 64), (2, [63, 1])],  # every token its own slice
]


def pair(name: str, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """Two copies of a zoo model with the same weights, in ``dtype``."""
    build = zoo_model(name).build
    torch.manual_seed(0)
    ref = build().to(dtype)
    model = build().to(dtype)
    model.load_state_dict(ref.state_dict())
    return ref, model


def batch_of(name: str, size: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A fixed batch; floating inputs and targets (the layer stack's) in ``dtype``."""
    batch = zoo_model(name).make_batch(size, generator=torch.Generator().manual_seed(7))
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in batch)


def check_sliced_equals_unsliced(name: str, slicings: Sequence[Slicing], dtype: torch.dtype, rtol: float, atol: float
                                 ) -> None:
    zm = zoo_model(name)
    ref, model = pair(name, dtype)
    batch = batch_of(name, sum(size for size, _ in slicings[0]), dtype)
    expected = zm.loss(ref, batch)
    expected.backward()
    slicer = TokenSlicer(model)
    for slicing in slicings:
        model.zero_grad()
        got = sliced_step(slicer, zm.loss, batch, slicing)
        torch.testing.assert_close(got, expected.detach(), rtol=rtol, atol=atol)
        for (n, p), q in zip(ref.named_parameters(), model.parameters(), strict=True):
            assert q.grad is not None, n
            torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=atol, msg=_named(n))


def _named(name: str) -> Callable[[str], str]:
    return lambda message: f"{name}: {message}"


def test_zoo_gpt_sliced_equals_unsliced_in_float64() -> None:
    check_sliced_equals_unsliced("gpt-tiny", GPT_SLICINGS, torch.float64, F64_RTOL, F64_ATOL)


def test_zoo_gpt_sliced_equals_unsliced_in_float32() -> None:
    check_sliced_equals_unsliced("gpt-tiny", GPT_SLICINGS[2:4], torch.float32, F32_RTOL, F32_ATOL)


def test_zoo_causal_layer_stack_sliced_equals_unsliced() -> None:
    """transformer-tiny: hidden states in, MSE against hidden states (8 tokens), the GPT's causal attention."""
    check_sliced_equals_unsliced("transformer-tiny", [[(2, [3, 5])], [(1, [1] * 8), (1, [8])]], torch.float64,
                                 F64_RTOL, F64_ATOL)


@pytest.mark.parametrize("name", ["hf-gpt2-tiny", "hf-llama-tiny"])
def test_hugging_face_sliced_equals_unsliced(name: str) -> None:
    """Through the model's own past-key-values path (GPT-2: 64 tokens, Llama: 32 with rotary positions and GQA)."""
    pytest.importorskip("transformers")
    seq = 64 if "gpt2" in name else 32
    slicings = [[(2, [seq])], [(2, [10, seq - 20, 1, 9])], [(1, [seq]), (1, [5, seq - 5])]]
    check_sliced_equals_unsliced(name, slicings, torch.float64, F64_RTOL, F64_ATOL)


def test_outside_a_cell_and_without_grad_the_model_is_unchanged() -> None:
    ref, model = pair("gpt-tiny", torch.float32)
    tokens = batch_of("gpt-tiny", 2, torch.float32)[0]
    slicer = TokenSlicer(model)
    assert slicer.swapped == ("embed", "blocks.0.attn", "blocks.1.attn")
    assert dict(ref.named_parameters()).keys() == dict(model.named_parameters()).keys()
    assert torch.equal(model(tokens), ref(tokens))
    with torch.no_grad():  # a forward-only sliced pass, then a training pass starting afresh
        parts = []
        for cell in token_cells([(2, [40, 24])], 2, 64):
            with slicer.cell(cell):
                parts.append(model(cell.take(tokens)))
    torch.testing.assert_close(torch.cat(parts, dim=1), ref(tokens), rtol=F32_RTOL, atol=F32_ATOL)
    sliced_step(slicer, zoo_model("gpt-tiny").loss, batch_of("gpt-tiny", 2, torch.float32), [(2, [32, 32])])


def test_bad_slicings_are_clear_errors() -> None:
    with pytest.raises(PlaitError, match="sum to 60 tokens, the sequence has 64"):
        token_cells([(2, [30, 30])], 2, 64)
    with pytest.raises(PlaitError, match="empty token slice"):
        token_cells([(2, [32, 0, 32])], 2, 64)
    with pytest.raises(PlaitError, match="empty token slice"):
        token_cells([(2, [])], 2, 64)
    with pytest.raises(PlaitError, match="hold 3 sequences, the batch has 4"):
        token_cells([(1, [64]), (2, [64])], 4, 64)
    with pytest.raises(PlaitError, match="at least one"):
        token_cells([(0, [64]), (4, [64])], 4, 64)
    with pytest.raises(PlaitError, match="at least one micro-batch"):
        token_cells([], 4, 64)
    _, model = pair("gpt-tiny", torch.float32)
    with pytest.raises(PlaitError, match="sum to 63 tokens"):
        sliced_step(TokenSlicer(model), zoo_model("gpt-tiny").loss, batch_of("gpt-tiny", 2, torch.float32), [(2, [63])])


def test_slices_out_of_order_are_clear_errors() -> None:
    _, model = pair("gpt-tiny", torch.float32)
    tokens = batch_of("gpt-tiny", 1, torch.float32)[0]
    slicer = TokenSlicer(model)
    first, second = Cell(0, 0, 1, 0, 32), Cell(0, 0, 1, 32, 32)
    with pytest.raises(PlaitError, match="expected the slice starting at token 0, got 32"), slicer.cell(second):
        pass
    outs = []
    for cell in (first, second):
        with slicer.cell(cell):
            outs.append(model(cell.take(tokens)).sum())
    with pytest.raises(PlaitError, match="reverse order: expected the slice starting at token 32, got 0"):
        slicer.backward(first, [outs[0]], [None])
    with pytest.raises(PlaitError, match="still has slices awaiting backward"), slicer.cell(first):
        pass
    slicer.backward(second, [outs[1]], [None])
    slicer.backward(first, [outs[0]], [None])
    with pytest.raises(PlaitError, match="already token-sliced"):
        TokenSlicer(model)


class _WithMHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class CrossAttention(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_models_that_cannot_be_sliced_are_refused_with_the_reason() -> None:
    with pytest.raises(PlaitError, match="nn.MultiheadAttention, which cannot attend to the cached keys"):
        TokenSlicer(_WithMHA())
    with pytest.raises(PlaitError, match=r"\(CrossAttention\) is an attention plait cannot slice"):
        TokenSlicer(nn.Sequential(nn.Linear(4, 4), CrossAttention()))
    with pytest.raises(PlaitError, match="no causal attention plait can slice"):
        TokenSlicer(zoo_model("mlp-tiny").build())


def test_hugging_face_models_other_than_gpt2_and_llama_are_refused() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=32, max_position_embeddings=16)
    with pytest.raises(PlaitError, match="supports gpt2, llama; GPTNeoXForCausalLM"):
        TokenSlicer(transformers.GPTNeoXForCausalLM(config))
