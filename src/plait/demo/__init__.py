"""``plait demo``: plan, train and check a small GPT on this machine."""

from plait.demo.job import DemoJob

__all__ = ["DemoJob"]
