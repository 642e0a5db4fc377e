"""Adam-preconditioned gradient norms: the noise scale that Adam-family optimizers see.

Adam divides each gradient element by ``sqrt(v_hat) + eps``, so a plain noise scale, which weighs every element
alike, underrates what a larger batch is worth to it (measured: ``bench/adaptive_noise.py``). Two forms, with
``w = 1 / (sqrt(v_hat) + eps)`` Adam's per-element step factor:

* ``"metric"`` (default): ``tr(W Sigma) / g^T W g``, the noise scale in the metric Adam steps in; the probe norms
  ``g * sqrt(w)``, so each element's square counts with Adam's own step factor;
* ``"pollux"``: ``tr(W Sigma W) / |W g|^2``, the pre-conditioned gradient's noise scale as Pollux (OSDI'21 §3.1)
  and AdaptDL's ``AdamScale`` measure it; the probe norms ``g * w``, each square weighted by ``1 / v_hat``. Early
  in training, while the second moments are young, it reads far below the plain noise scale.

``AdamPreconditioner`` keeps the probe's element weights laid out like the gradients' storage (a WFBP bucket's flat
buffer), refreshed from the optimizer's state every few steps (the second moments move slowly). Both norms of a
step (local and synchronised) are weighted alike, so the estimator stays unbiased for the weighted gradient (with
the weights held fixed over the step).

It needs gradients whose storage lives across steps (the Trainer allows it on replicated plans, whose gradients
are views of the buckets' flat buffers); a tensor whose storage it does not know is normed unweighted.
"""

from __future__ import annotations

from typing import Literal

import torch

DEFAULT_REFRESH_EVERY = 20  # optimizer steps between two refreshes of the weights (after steps 1, 2, 4, 8, 16 first)
PreconditionForm = Literal["metric", "pollux"]
PRECONDITION_FORMS: tuple[PreconditionForm, ...] = ("metric", "pollux")


class AdamPreconditioner:
    """The probe's element weights of an Adam-family optimizer, by gradient storage: ``sqrt(w)`` (``"metric"``) or
    ``w`` (``"pollux"``), with ``w = 1 / (sqrt(v_hat) + eps)``."""

    def __init__(self, *, form: PreconditionForm = "metric", refresh_every: int = DEFAULT_REFRESH_EVERY) -> None:
        if form not in PRECONDITION_FORMS:
            raise ValueError(f"precondition form {form!r} is not one of {', '.join(PRECONDITION_FORMS)}")
        self.form = form
        self.refresh_every = max(1, refresh_every)
        self._weights: dict[int, torch.Tensor] = {}  # gradient storage's address -> weights over the whole storage
        self._scratch: dict[int, torch.Tensor] = {}  # the same layout: where ``apply`` writes its products
        self._views: dict[tuple[int, int, torch.Size], tuple[torch.Tensor, torch.Tensor]] = {}  # apply's, by place

    @property
    def ready(self) -> bool:
        """Whether weights are known (after the optimizer's first step)."""
        return bool(self._weights)

    def after_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """After the run's optimizer step number ``step`` (from 1, counted across restarts): refresh the weights
        after steps 1, 2, 4, ... below ``refresh_every`` (young second moments move fast), then every
        ``refresh_every`` steps."""
        if (step < self.refresh_every and step & (step - 1) == 0) or step % self.refresh_every == 0:
            self.refresh(optimizer)

    @torch.no_grad()
    def refresh(self, optimizer: torch.optim.Optimizer) -> None:
        """Read ``v_hat`` of every parameter with a gradient and write its probe weights where its gradient lives.
        The second moments are copied in (one fused ``foreach`` call per param group); the arithmetic then runs on
        each whole flat storage at once where one bias correction and one ``eps`` hold for all of it (a WFBP bucket),
        else per tensor (``foreach``): a few kernels per bucket, whatever its number of parameters."""
        per_storage: dict[int, list[tuple[torch.Tensor, float, float]]] = {}  # views with (correction, eps)
        for group in optimizer.param_groups:
            beta2, eps = group["betas"][1], group["eps"]
            views, moments = [], []
            for p in group["params"]:
                grad, state = p.grad, optimizer.state.get(p, {})
                if grad is None or "exp_avg_sq" not in state:
                    continue
                views.append(self._weights_view(grad))
                moments.append(state["exp_avg_sq"])
                correction = 1.0 - beta2 ** float(state["step"])
                per_storage.setdefault(grad.untyped_storage().data_ptr(), []).append((views[-1], correction, eps))
            if views:
                torch._foreach_copy_(views, moments)
        for key, entries in per_storage.items():
            weights = self._weights[key]
            settings = {(c, e) for _, c, e in entries}
            if len(settings) == 1 and sum(v.numel() for v, _, _ in entries) == weights.numel():
                (correction, eps), = settings
                self._to_weights([weights], correction, eps)
            else:
                for correction, eps in settings:
                    self._to_weights([v for v, c, e in entries if (c, e) == (correction, eps)], correction, eps)

    def _to_weights(self, tensors: list[torch.Tensor], correction: float, eps: float) -> None:
        """Second moments (in place) -> ``1 / (sqrt(v / correction) + eps)``, square-rooted for the metric form."""
        torch._foreach_div_(tensors, correction)
        torch._foreach_sqrt_(tensors)
        torch._foreach_add_(tensors, eps)
        torch._foreach_reciprocal_(tensors)
        if self.form == "metric":
            torch._foreach_sqrt_(tensors)

    def _weights_view(self, grad: torch.Tensor) -> torch.Tensor:
        """Where ``grad``'s weights live: its place in the weights laid out over its storage (made on first use)."""
        storage = grad.untyped_storage()
        size = storage.nbytes() // grad.element_size()
        weights = self._weights.get(storage.data_ptr())
        if weights is None or weights.numel() != size or weights.dtype != grad.dtype:
            weights = torch.ones(size, dtype=grad.dtype, device=grad.device)
            self._weights[storage.data_ptr()] = weights
            self._views.clear()  # views of weights that are gone
        return weights[grad.storage_offset() : grad.storage_offset() + grad.numel()].view_as(grad)

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` times its weights, or ``tensor`` itself where no weights are known. The product is written
        into a buffer kept per gradient storage (fresh buffers cost page faults on a CPU) and is valid until the
        next ``apply`` on the same storage: norm it at once."""
        key = (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()), tensor.shape)
        views = self._views.get(key)
        if views is None:
            weights = self._weights.get(key[0])
            if weights is None:
                return tensor
            scratch = self._scratch.get(key[0])
            if scratch is None or scratch.numel() != weights.numel():
                scratch = self._scratch[key[0]] = torch.empty_like(weights)
            start, end = tensor.storage_offset(), tensor.storage_offset() + tensor.numel()
            views = self._views[key] = (weights[start:end].view_as(tensor), scratch[start:end].view_as(tensor))
        return torch.mul(tensor, views[0], out=views[1])
