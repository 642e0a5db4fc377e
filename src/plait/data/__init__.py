"""Data for the demo and tests: a generated corpus, a character tokenizer, step-indexed batches."""

from plait.data.corpus import generate_corpus
from plait.data.text import CharTokenizer, TextBatches

__all__ = ["CharTokenizer", "TextBatches", "generate_corpus"]
