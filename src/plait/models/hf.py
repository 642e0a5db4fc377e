"""Hugging Face GPT-2 and Llama built from their configs (never downloaded); ``transformers`` is imported lazily."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plait.errors import PlaitError
from plait.models.gpt import token_batch


@dataclass(frozen=True, kw_only=True)
class HFGPT2Config:
    """The GPT2Config fields plait sets; dropout is off, as in plait's own GPT."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

    @property
    def num_params(self) -> int:
        """Parameter count of GPT2LMHeadModel (``lm_head`` is tied to ``wte``, so counted once)."""
        h, v, t, n = self.n_embd, self.vocab_size, self.n_positions, self.n_layer
        return v * h + t * h + n * (12 * h * h + 13 * h) + 2 * h


HF_GPT2_CONFIGS: dict[str, HFGPT2Config] = {
    "hf-gpt2-tiny": HFGPT2Config(vocab_size=128, n_positions=64, n_layer=2, n_head=2, n_embd=64),
    "hf-gpt2": HFGPT2Config(),
    "hf-gpt2-medium": HFGPT2Config(n_layer=24, n_head=16, n_embd=1024),
}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise PlaitError(
            "the Hugging Face models need the transformers package; install it with "
            "`pip install 'plait[hf]'` (or `pip install transformers`)"
        ) from exc
    return transformers


def hf_gpt2(cfg: HFGPT2Config) -> nn.Module:
    """``GPT2LMHeadModel`` of ``cfg`` on the current default device (build under ``torch.device("meta")``)."""
    tf = _transformers()
    config = tf.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.n_positions,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.n_embd,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        bos_token_id=cfg.vocab_size - 1,
        eos_token_id=cfg.vocab_size - 1,
        attn_implementation="sdpa",
    )
    return tf.GPT2LMHeadModel(config)


@dataclass(frozen=True, kw_only=True)
class HFLlamaConfig:
    """The LlamaConfig fields plait sets (grouped-query attention when ``num_kv_heads < num_heads``)."""

    vocab_size: int = 32000
    max_positions: int = 2048
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    hidden: int = 4096
    intermediate: int = 11008

    @property
    def num_params(self) -> int:
        """Parameter count of LlamaForCausalLM with an untied output projection."""
        h, v, kv = self.hidden, self.vocab_size, self.hidden * self.num_kv_heads // self.num_heads
        block = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate + 2 * h
        return 2 * v * h + self.num_layers * block + h


HF_LLAMA_CONFIGS: dict[str, HFLlamaConfig] = {
    "hf-llama-tiny": HFLlamaConfig(vocab_size=128, max_positions=32, num_layers=2, num_heads=4, num_kv_heads=2, hidden=64,
                                   intermediate=128),
    "hf-llama-7b": HFLlamaConfig(),
}


def hf_llama(cfg: HFLlamaConfig) -> nn.Module:
    """``LlamaForCausalLM`` of ``cfg`` on the current default device (build under ``torch.device("meta")``)."""
    tf = _transformers()
    config = tf.LlamaConfig(
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_positions,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return tf.LlamaForCausalLM(config)


def hf_llama_batch(
    cfg: HFLlamaConfig,
    batch_size: int,
    *,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(tokens, targets)`` of the config's full context length."""
    return token_batch(cfg.vocab_size, cfg.max_positions, batch_size, device=device, generator=generator)


def hf_lm_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Next-token cross-entropy of a Hugging Face causal LM on ``(tokens, targets)``."""
    tokens, targets = batch
    logits = model(input_ids=tokens).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def hf_lm_batch(
    cfg: HFGPT2Config,
    batch_size: int,
    *,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(tokens, targets)`` of the config's full context length."""
    return token_batch(cfg.vocab_size, cfg.n_positions, batch_size, device=device, generator=generator)
