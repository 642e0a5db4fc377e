"""Character-level tokenisation and deterministic, step-indexed batches of text."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CharTokenizer:
    """Maps each character of a fixed alphabet to an id."""

    alphabet: str

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The tokenizer whose alphabet is the sorted set of characters in ``text``."""
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        """Number of distinct ids."""
        return len(self.alphabet)

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text`` as a 1-D int64 tensor."""
        index = {c: i for i, c in enumerate(self.alphabet)}
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> str:
        """Text of a 1-D tensor of ids."""
        return "".join(self.alphabet[i] for i in ids.tolist())


@dataclass(frozen=True)
class TextBatches:
    """Global batches of ``(tokens, targets)`` windows; batch ``step`` is the same on every rank and run."""

    tokens: torch.Tensor
    seq_len: int
    global_batch: int
    seed: int = 0

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch for optimizer step ``step``."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.global_batch,), generator=gen)
        offsets = torch.arange(self.seq_len + 1)
        windows = self.tokens[starts[:, None] + offsets[None, :]]
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
