"""The demo job: a small GPT on plait's generated corpus, shared by the ranks and the reference run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cached_property

import torch

from plait.data import CharTokenizer, SampleStream, TensorSamples, TextBatches, generate_corpus
from plait.models.gpt import GPT, GPTConfig, lm_loss

__all__ = ["BATCH_PER_RANK", "DemoJob", "lm_loss"]

BATCH_PER_RANK = 8  # the global batch is 8 per rank, so it splits over any number of ranks (32 on the default 4)


@dataclass(frozen=True, kw_only=True)
class DemoJob:
    """Everything that defines the demo's training: model size, data, batch, optimizer, seed."""

    steps: int = 100
    nproc: int = 4
    global_batch: int = 32
    seq_len: int = 64
    num_layers: int = 4
    num_heads: int = 4
    hidden: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    corpus_chars: int = 200_000
    adaptive: bool = False  # `plait demo --adaptive`: adaptive batch (goodput) from a sample stream of the corpus
    adapt_batch_every: int = 10

    @classmethod
    def for_ranks(cls, nproc: int, *, steps: int) -> DemoJob:
        """The demo job on ``nproc`` ranks, with a global batch of ``BATCH_PER_RANK`` per rank."""
        return cls(steps=steps, nproc=nproc, global_batch=BATCH_PER_RANK * nproc)

    def to_json(self) -> str:
        """The job as JSON, passed to each rank."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DemoJob:
        """Inverse of ``to_json``."""
        return cls(**json.loads(text))

    @cached_property
    def text(self) -> str:
        """The generated corpus."""
        return generate_corpus(self.corpus_chars, seed=self.seed)

    @cached_property
    def tokenizer(self) -> CharTokenizer:
        """Character tokenizer of the corpus."""
        return CharTokenizer.from_text(self.text)

    @property
    def model_config(self) -> GPTConfig:
        """The GPT's sizes."""
        return GPTConfig(vocab_size=self.tokenizer.vocab_size, seq_len=self.seq_len, num_layers=self.num_layers,
                         num_heads=self.num_heads, hidden=self.hidden)

    def build_model(self) -> GPT:
        """A fresh GPT (initialised from the current torch seed)."""
        return GPT(self.model_config)

    def data(self) -> TextBatches:
        """Step-indexed global batches of the corpus."""
        return TextBatches(self.tokenizer.encode(self.text), self.seq_len, self.global_batch, seed=self.seed)

    def samples(self) -> SampleStream:
        """The corpus as indexed samples (windows at half-window stride), in a seeded order: the adaptive demo's data."""
        tokens = self.tokenizer.encode(self.text)
        starts = torch.arange(0, len(tokens) - self.seq_len - 1, self.seq_len // 2)
        windows = tokens[starts[:, None] + torch.arange(self.seq_len + 1)[None, :]]
        return SampleStream(TensorSamples(windows[:, :-1].contiguous(), windows[:, 1:].contiguous()), seed=self.seed)

    def example_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A meta batch for capture."""
        shape = (batch_size, self.seq_len)
        return torch.empty(shape, dtype=torch.long, device="meta"), torch.empty(shape, dtype=torch.long, device="meta")
