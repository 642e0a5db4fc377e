"""SampleStream: every epoch is a permutation of the dataset, whatever batch sizes read it, across checkpoints."""

from __future__ import annotations

import pytest
import torch

from plait.data import SampleStream, TensorSamples, epoch_order
from plait.errors import PlaitError


def _stream(n: int = 10, **kwargs: object) -> SampleStream:
    return SampleStream(TensorSamples(torch.arange(n), torch.arange(n) * 10), **kwargs)  # type: ignore[arg-type]


def test_batches_of_changing_size_cover_each_epoch_once() -> None:
    stream = _stream(10, seed=3)
    seen = torch.cat([stream.next_indices(k) for k in (3, 4, 1, 5, 2, 5)])  # 20 samples: two epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:])  # each epoch has its own order
    assert stream.epoch == 2 and stream.position == 20


def test_batch_rows_follow_indices() -> None:
    stream = _stream(6, shuffle=False)
    x, y = stream.next_batch(4)
    assert x.tolist() == [0, 1, 2, 3] and y.tolist() == [0, 10, 20, 30]
    x, _ = stream.next_batch(4)
    assert x.tolist() == [4, 5, 0, 1]


def test_state_round_trip_continues_on_the_next_sample() -> None:
    whole = _stream(7, seed=1)
    reference = torch.cat([whole.next_indices(k) for k in (2, 3, 4, 5)])
    first = _stream(7, seed=1)
    head = torch.cat([first.next_indices(k) for k in (2, 3)])
    resumed = _stream(7, seed=1)
    resumed.load_state_dict(first.state_dict())
    tail = torch.cat([resumed.next_indices(k) for k in (4, 5)])
    assert torch.equal(torch.cat([head, tail]), reference)


def test_drop_last_starts_the_next_epoch_when_the_rest_is_short() -> None:
    stream = _stream(5, seed=0, drop_last=True)
    stream.next_indices(3)
    second = stream.next_indices(3)
    assert stream.epoch == 1 and torch.equal(second, epoch_order(5, 1, seed=0)[:3])


def test_clear_errors() -> None:
    with pytest.raises(PlaitError, match="disagree on the number of samples"):
        TensorSamples(torch.zeros(3), torch.zeros(4))
    with pytest.raises(PlaitError, match="at least one sample"):
        _stream().next_indices(0)
    state = _stream(seed=1).state_dict()
    with pytest.raises(PlaitError, match="same dataset and seed"):
        _stream(seed=2).load_state_dict(state)
