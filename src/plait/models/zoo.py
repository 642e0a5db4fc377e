"""Named zoo models: build on any device, make example batches, compute the loss."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from plait.errors import PlaitError
from plait.models.encoder import ENCODER_CONFIGS, Encoder, encoder_batch
from plait.models.gpt import GPT, GPT_CONFIGS, lm_batch, lm_loss
from plait.models.hf import (
    HF_GPT2_CONFIGS,
    HF_LLAMA_CONFIGS,
    hf_gpt2,
    hf_llama,
    hf_llama_batch,
    hf_lm_batch,
    hf_lm_loss,
)
from plait.models.mlp import MLP, MLP_CONFIGS, mse_loss, regression_batch

Batch = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class ZooModel:
    """A named model with its batch maker and loss."""

    name: str
    build: Callable[[], nn.Module]  # builds on the current default device (use ``torch.device("meta")``)
    make_batch: Callable[..., Batch]  # (batch_size, *, device, generator) -> batch
    loss: Callable[[nn.Module, Batch], torch.Tensor]


def _entries() -> dict[str, ZooModel]:
    entries: dict[str, ZooModel] = {}
    for name, gcfg in GPT_CONFIGS.items():
        entries[name] = ZooModel(name, partial(GPT, gcfg), partial(lm_batch, gcfg), lm_loss)
    for name, mcfg in MLP_CONFIGS.items():
        entries[name] = ZooModel(name, partial(MLP, mcfg), partial(regression_batch, mcfg), mse_loss)
    for name, ecfg in ENCODER_CONFIGS.items():
        entries[name] = ZooModel(name, partial(Encoder, ecfg), partial(encoder_batch, ecfg), mse_loss)
    for name, hcfg in HF_GPT2_CONFIGS.items():  # need transformers only when built
        entries[name] = ZooModel(name, partial(hf_gpt2, hcfg), partial(hf_lm_batch, hcfg), hf_lm_loss)
    for name, lcfg in HF_LLAMA_CONFIGS.items():
        entries[name] = ZooModel(name, partial(hf_llama, lcfg), partial(hf_llama_batch, lcfg), hf_lm_loss)
    return entries


ZOO: dict[str, ZooModel] = _entries()


def zoo_model(name: str) -> ZooModel:
    """Look up a zoo model by name; the error lists the known names."""
    if name not in ZOO:
        raise PlaitError(f"unknown model {name!r}; zoo models: {', '.join(ZOO)}")
    return ZOO[name]
