"""track_peak_memory against allocation patterns whose peak is known exactly."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from plait.profiling.memory import live_tensor_bytes, peak_of_events, track_peak_memory

MB4 = 1000 * 1000 * 4  # a (1000, 1000) fp32 tensor


@pytest.mark.parametrize("method", ["storages", "allocator"])
def test_known_pattern(method: str) -> None:
    with track_peak_memory(method=method) as mem:
        a = torch.empty(1000, 1000)  # 4 MB
        b = torch.empty(2000, 1000)  # 12 MB live
        del a
        c = torch.empty(500, 1000)  # 10 MB live
        del b, c
    assert mem.peak_bytes == 3 * MB4
    assert mem.end_bytes == 0


def test_frees_in_another_thread_and_of_older_tensors_count() -> None:
    holder = [torch.empty(1000, 1000)]  # alive before the block: a baseline tensor
    with track_peak_memory() as mem:
        x = torch.empty(250, 1000)  # +1 MB
        holder.append(x)
        del x
        worker = threading.Thread(target=holder.clear)  # frees both tensors in another thread
        worker.start()
        worker.join()
        y = torch.empty(500, 1000)  # 2 MB, but 4 MB + 1 MB were freed
        del y
    assert mem.peak_bytes == MB4 // 4
    assert mem.end_bytes == -MB4


def test_storage_resizes_count() -> None:
    t = torch.empty(1000, 1000)
    storage = t.untyped_storage()
    storage.resize_(0)  # how FSDP2 frees an unsharded parameter
    with track_peak_memory() as mem:
        storage.resize_(MB4)  # ... and gathers it again
        torch.zeros(1)  # any op lets the tracker see the new size
        storage.resize_(0)
        torch.zeros(1)
    assert mem.peak_bytes == MB4 + 4
    assert mem.end_bytes == 0


def test_baseline_and_a_training_step() -> None:
    model = nn.Linear(100, 100)
    x = torch.randn(64, 100)
    with track_peak_memory(baseline=[model]) as mem:
        y = model(x)  # kept alive through backward
        y.sum().backward()
        del y
    weights = (100 * 100 + 100) * 4
    assert mem.baseline_bytes == weights
    # the output (64 x 100) and the new gradients (the size of the weights) are alive together,
    # with a few scalars (the sum and its gradient)
    assert 64 * 100 * 4 + weights <= mem.peak_bytes <= 64 * 100 * 4 + weights + 64
    assert mem.end_bytes == weights  # the gradients stay
    assert mem.total_peak_bytes == weights + mem.peak_bytes


def test_live_tensor_bytes_counts_shared_storage_once() -> None:
    base = torch.empty(10, 10)
    optimizer = torch.optim.SGD([nn.Parameter(torch.empty(5))], lr=0.1)
    assert live_tensor_bytes([base, base[2:], base.view(100), {"x": [base]}]) == 400
    assert live_tensor_bytes([optimizer]) == 0  # no state before the first step


def test_event_peak_handles_unseen_frees_by_address_reuse() -> None:
    # a block at address 7 allocated twice with no free between: the first one was freed unseen
    assert peak_of_events([(0, 7, 100), (1, 8, 50), (2, 7, 100), (3, 7, -100)]) == (150, 50)
