"""Fake copies of a model and its inputs: CPU tensors with shapes and dtypes but no storage."""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from plait.errors import CaptureError

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.bool: "bool",
    torch.int8: "int8",
    torch.uint8: "uint8",
}


def dtype_name(dtype: torch.dtype) -> str:
    """plait's short name of a torch dtype (``torch.bfloat16`` -> ``"bf16"``)."""
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def storage_key(t: torch.Tensor) -> int:
    """An id shared by a tensor and all its views (the address of the storage object)."""
    return int(t.untyped_storage()._cdata)


def new_fake_mode() -> FakeTensorMode:
    """A fake mode that also accepts stray real tensors (e.g. a constant created inside forward)."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def _fake_like(t: torch.Tensor) -> torch.Tensor:
    # Must run under a fake mode; meta and real tensors alike become fake CPU tensors (no allocation).
    return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="cpu")


def fake_model(model: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are fake; the original is left untouched.

    The deepcopy memo maps every parameter and buffer to its fake twin, so real weights are never
    copied and tied parameters stay tied.
    """
    memo: dict[int, Any] = {}
    with mode:
        for p in model.parameters():
            memo[id(p)] = nn.Parameter(_fake_like(p), requires_grad=p.requires_grad)
        for b in model.buffers():
            memo[id(b)] = _fake_like(b)
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:  # a module holding an object that cannot be copied
        raise CaptureError(
            f"cannot copy model {type(model).__name__} to fake tensors: {type(exc).__name__}: {exc}. "
            "capture() deep-copies the module tree (its parameters are replaced, never copied); "
            "remove uncopyable attributes (open files, locks, process groups) from the modules."
        ) from exc


def as_input_tuple(example_inputs: Any) -> tuple[Any, ...]:
    """The example inputs as a tuple, checking they hold at least one tensor."""
    inputs = example_inputs if isinstance(example_inputs, tuple | list) else (example_inputs,)
    if not any(isinstance(x, torch.Tensor) for x in inputs):
        raise CaptureError(
            f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}; "
            "pass e.g. torch.empty(batch, seq, dtype=torch.long, device='meta')"
        )
    return tuple(inputs)


def fake_inputs(inputs: tuple[Any, ...], mode: FakeTensorMode) -> tuple[Any, ...]:
    """Fake versions of the tensors in ``inputs``, keeping ``requires_grad`` (other values pass through)."""
    with mode:
        return tuple(
            _fake_like(x).requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
            for x in inputs
        )


def main_dtype(model: nn.Module) -> str:
    """The dtype holding most floating-point parameter elements ("fp32" for a model without any)."""
    counts: Counter[torch.dtype] = Counter()
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] += p.numel()
    return dtype_name(counts.most_common(1)[0][0]) if counts else "fp32"


def buffer_bytes(model: nn.Module) -> int:
    """Bytes of the model's buffers, each storage counted once."""
    seen: dict[int, int] = {}
    for b in model.buffers():
        seen[storage_key(b)] = b.untyped_storage().nbytes()
    return sum(seen.values())


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_to(dtype: str | None) -> contextlib.AbstractContextManager[object]:
    """Autocast of the (fake, CPU) capture to ``dtype`` ("bf16", "fp16"), as the runtime's mixed precision
    runs the model; a null context for None or "fp32"."""
    if dtype is None or dtype == "fp32":
        return contextlib.nullcontext()
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"cannot capture in {dtype!r}; use one of fp32, {', '.join(AUTOCAST_DTYPES)}")
    return torch.autocast("cpu", dtype=AUTOCAST_DTYPES[dtype])
