"""Models that cannot be captured raise a CaptureError naming the module, the cause and a fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from plait.errors import CaptureError, PlaitError
from plait.graph import capture
from plait.models import MLP, MLPConfig


class Wrapper(nn.Module):
    """``pre`` (a Linear) then a faulty ``inner`` block."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.pre(x))


class BranchOnValue(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # Python control flow on a tensor value
            return self.fc(x)
        return x


class ReadsItem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * x.abs().max().item()


class ToList(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        widths = x[0].long().tolist()
        return self.fc(x)[:, : max(widths) + 1]


class MaskSelect(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y[y > 0]  # output shape depends on values


@torch.library.custom_op("plait_test::opaque", mutates_args=())
def opaque(x: torch.Tensor) -> torch.Tensor:
    """A custom op with a CPU kernel but no fake implementation."""
    return x.clone()


_LIB = torch.library.Library("plait_test_old", "DEF")
_LIB.define("twice(Tensor x) -> Tensor")
_LIB.impl("twice", lambda x: x * 2, "CPU")  # an old-style op with only a CPU kernel


class UsesOpaque(nn.Module):
    def __init__(self, old_style: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.old_style = old_style

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.old_style:
            return torch.ops.plait_test_old.twice(self.fc(x))
        return opaque(self.fc(x))


def _capture_inner(inner: nn.Module) -> CaptureError:
    with pytest.raises(CaptureError) as info:
        capture(Wrapper(inner), torch.randn(2, 4))
    return info.value


@pytest.mark.parametrize("inner", [BranchOnValue, ReadsItem, ToList, MaskSelect])
def test_value_dependent_code_names_module_and_fix(inner: type[nn.Module]) -> None:
    msg = str(_capture_inner(inner()))
    assert "module 'inner'" in msg
    assert "no values" in msg and "torch.where" in msg


@pytest.mark.parametrize("old_style", [False, True])
def test_op_without_fake_kernel(old_style: bool) -> None:
    msg = str(_capture_inner(UsesOpaque(old_style)))
    assert "module 'inner'" in msg and "register_fake" in msg
    if old_style:
        assert "operator plait_test_old.twice.default has no fake (meta) kernel" in msg


def test_wrong_input_shape_names_the_innermost_module() -> None:
    model = MLP(MLPConfig(in_dim=16, hidden=8, num_layers=2, out_dim=4))
    with pytest.raises(CaptureError) as info:
        capture(model, torch.randn(3, 15))
    msg = str(info.value)
    assert "module 'layers.0.fc'" in msg and "(3, 15) float32" in msg and "example_inputs" in msg


def test_wrong_number_of_inputs_suggests_loss_fn() -> None:
    model = MLP(MLPConfig(in_dim=16, hidden=8, num_layers=2, out_dim=4))
    with pytest.raises(CaptureError, match="loss_fn"):
        capture(model, (torch.randn(3, 16), torch.randn(3, 4)))


def test_bad_arguments() -> None:
    with pytest.raises(CaptureError, match="nn.Module"):
        capture("not a model", torch.randn(2, 4))  # type: ignore[arg-type]
    with pytest.raises(CaptureError, match="tuple of tensors"):
        capture(nn.Linear(4, 4), [1, 2])  # type: ignore[arg-type]
    with pytest.raises(CaptureError, match="scalar"):
        capture(nn.Linear(4, 4), (torch.randn(2, 4),), loss_fn=lambda m, b: m(*b))
    assert issubclass(CaptureError, PlaitError)


def test_model_is_usable_after_a_failed_capture() -> None:
    model = Wrapper(ReadsItem())
    with pytest.raises(CaptureError):
        capture(model, torch.randn(2, 4))
    x = torch.randn(2, 4)
    assert model(x).shape == (2, 4)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_export_failure_suggests_with_ops_false(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unsupported construct\nlong trace")

    monkeypatch.setattr(torch.export, "export", refuse)
    model = MLP(MLPConfig(in_dim=4, hidden=4, num_layers=1, out_dim=2))
    with pytest.raises(
        CaptureError, match=r"op graph of MLP: RuntimeError: unsupported construct\..*with_ops=False"
    ):
        capture(model, torch.randn(2, 4))
    assert capture(model, torch.randn(2, 4), with_ops=False).num_params == 4 * 4 + 4 + 4 * 2 + 2
