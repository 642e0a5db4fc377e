"""Data for the demo and tests: a generated corpus, a character tokenizer, step-indexed batches, sample streams."""

from plait.data.corpus import generate_corpus
from plait.data.samples import Samples, SampleStream, TensorSamples, epoch_order
from plait.data.text import CharTokenizer, TextBatches

__all__ = ["CharTokenizer", "SampleStream", "Samples", "TensorSamples", "TextBatches", "epoch_order", "generate_corpus"]
