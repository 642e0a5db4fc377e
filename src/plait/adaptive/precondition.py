"""Adam-preconditioned gradient norms: Pollux's noise scale for Adam-family optimizers.

Adam divides each gradient element by ``sqrt(v_hat) + eps``. Its useful noise scale is that of the
*preconditioned* gradient (Pollux, OSDI'21 §3.1; AdaptDL's ``AdamScale``): the plain noise scale weighs
every element alike and, measured on Adam, underrates what a larger batch is worth. ``AdamPreconditioner``
keeps the element weights ``1 / (sqrt(v_hat) + eps)`` laid out like the gradients' storage (a WFBP bucket's flat
buffer), refreshed from the optimizer's state every few steps (the second moments move slowly), and the probe
norms ``g * w`` in place of ``g``. Both norms of a step (local and synchronised) are weighted alike, so the
estimator stays unbiased for the preconditioned gradient (with the weights held fixed over the step).

It needs gradients whose storage lives across steps (the Trainer allows it on replicated plans, whose gradients
are views of the buckets' flat buffers); a tensor whose storage it does not know is normed unweighted.
"""

from __future__ import annotations

import torch

DEFAULT_REFRESH_EVERY = 10  # optimizer steps between two refreshes of the weights


class AdamPreconditioner:
    """Element weights ``1 / (sqrt(v_hat) + eps)`` of an Adam-family optimizer, by gradient storage."""

    def __init__(self, *, refresh_every: int = DEFAULT_REFRESH_EVERY) -> None:
        self.refresh_every = max(1, refresh_every)
        self._weights: dict[int, torch.Tensor] = {}  # gradient storage's address -> weights over the whole storage
        self.steps = 0

    @property
    def ready(self) -> bool:
        """Whether weights are known (after the optimizer's first step)."""
        return bool(self._weights)

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Count an optimizer step; refresh the weights on the first and every ``refresh_every`` steps."""
        self.steps += 1
        if self.steps == 1 or self.steps % self.refresh_every == 0:
            self.refresh(optimizer)

    @torch.no_grad()
    def refresh(self, optimizer: torch.optim.Optimizer) -> None:
        """Read ``v_hat`` of every parameter with a gradient and write its weights where its gradient lives."""
        for group in optimizer.param_groups:
            beta2, eps = group["betas"][1], group["eps"]
            for p in group["params"]:
                grad, state = p.grad, optimizer.state.get(p, {})
                if grad is None or "exp_avg_sq" not in state:
                    continue
                storage = grad.untyped_storage()
                size = storage.nbytes() // grad.element_size()
                weights = self._weights.get(storage.data_ptr())
                if weights is None or weights.numel() != size or weights.dtype != grad.dtype:
                    weights = torch.ones(size, dtype=grad.dtype, device=grad.device)
                    self._weights[storage.data_ptr()] = weights
                view = weights[grad.storage_offset() : grad.storage_offset() + grad.numel()].view_as(grad)
                correction = 1.0 - beta2 ** float(state["step"])
                torch.div(state["exp_avg_sq"], correction, out=view)
                view.sqrt_().add_(eps).reciprocal_()

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` times its weights (a temporary), or ``tensor`` itself where no weights are known."""
        weights = self._weights.get(tensor.untyped_storage().data_ptr())
        if weights is None:
            return tensor
        start = tensor.storage_offset()
        return tensor * weights[start : start + tensor.numel()].view_as(tensor)
