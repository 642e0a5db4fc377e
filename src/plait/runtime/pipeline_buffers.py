"""Pipeline receive buffers that hold memory only while their micro-batch is in flight.

``torch.distributed.pipelining`` allocates, when a stage is set up, one receive buffer per micro-batch for the
input activation and one for the output's gradient, and keeps all of them for the whole run: with hundreds of
micro-batches (GPT-1T on 3,072 GPUs runs 512 per pipeline) they outweigh everything else on a stage.
``LazyRecvStage`` keeps torch's buffers (their shapes, the transfers and the schedule are unchanged) but gives
each one storage only from the moment its receive is posted until the micro-batch's last backward pass
(``B``, or ``W`` when the backward is split) has run: the memory of at most the micro-batches in flight, as
plait's pipeline lowering counts it.

This module names private parts of torch's stage (its per-micro-batch receive records and the buffer factory),
which plait pins below torch 2.14.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining import stage as torch_stage


class LazyRecvStage(PipelineStage):
    """A ``PipelineStage`` whose receive buffers have storage only while their micro-batch is in flight."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy: dict[int, torch.Tensor] = {}  # buffers this stage made storage-less, by id

    def _setup_forward_recv_info(self, num_microbatches: int, has_backward: bool) -> None:
        with self._storageless_buffers():
            super()._setup_forward_recv_info(num_microbatches, has_backward)

    def _setup_backward_recv_info(self, num_microbatches: int) -> None:
        with self._storageless_buffers():
            super()._setup_backward_recv_info(num_microbatches)

    def get_fwd_recv_ops(self, fwd_chunk_id: int) -> list[Any]:
        """torch's receive of the input activation, into a buffer given its storage now."""
        self._materialize(self.args_recv_info[fwd_chunk_id])
        return super().get_fwd_recv_ops(fwd_chunk_id)

    def get_bwd_recv_ops(self, bwd_chunk_id: int) -> list[Any]:
        """torch's receive of the output's gradient, into a buffer given its storage now."""
        self._materialize(self.grad_recv_info.get(bwd_chunk_id, ()))
        return super().get_bwd_recv_ops(bwd_chunk_id)

    def backward_one_chunk(self, bwd_chunk_id: int, loss: Any = None, full_backward: bool = True,
                           last_backward: bool = False) -> None:
        """torch's backward of one micro-batch; a whole backward lets its receive buffers go."""
        super().backward_one_chunk(bwd_chunk_id, loss=loss, full_backward=full_backward, last_backward=last_backward)
        if full_backward:
            self._release_micro(bwd_chunk_id)

    def backward_weight_one_chunk(self, bwd_chunk_id: int, last_backward: bool = False) -> None:
        """torch's weight pass of one micro-batch; the micro-batch is done with its receive buffers."""
        super().backward_weight_one_chunk(bwd_chunk_id, last_backward=last_backward)
        self._release_micro(bwd_chunk_id)

    def _release_micro(self, chunk: int) -> None:
        """Free the storage of ``chunk``'s receive buffers (input and output gradient)."""
        for infos in (self.args_recv_info.get(chunk, ()), self.grad_recv_info.get(chunk, ())):
            for info in infos:
                buffer = info.buffer
                if isinstance(buffer, torch.Tensor) and self._owns(buffer):
                    buffer.untyped_storage().resize_(0)

    def _materialize(self, infos: Any) -> None:
        """Give ``infos``' buffers their storage back (their content is about to be received)."""
        for info in infos:
            buffer = info.buffer
            if self._owns(buffer) and buffer.untyped_storage().nbytes() == 0:
                buffer.untyped_storage().resize_(_storage_bytes(buffer))

    def _owns(self, buffer: Any) -> bool:
        """Whether ``buffer`` is one this stage made (a same-rank stage may have put another tensor there)."""
        return isinstance(buffer, torch.Tensor) and self._lazy.get(id(buffer)) is buffer

    @contextmanager
    def _storageless_buffers(self) -> Iterator[None]:
        """While torch sets up its receive records, every buffer it makes gives its storage back at once."""
        make: Callable[..., Any] = torch_stage._make_tensor_from_meta

        def storageless(*args: Any, **kwargs: Any) -> Any:
            buffer = make(*args, **kwargs)
            if isinstance(buffer, torch.Tensor):
                buffer.untyped_storage().resize_(0)
                self._lazy[id(buffer)] = buffer
            return buffer

        torch_stage._make_tensor_from_meta = storageless
        try:
            yield
        finally:
            torch_stage._make_tensor_from_meta = make


def _storage_bytes(buffer: torch.Tensor) -> int:
    """The bytes ``buffer``'s view needs from its storage."""
    if buffer.numel() == 0:
        return 0
    extent = 1 + sum((size - 1) * stride for size, stride in zip(buffer.shape, buffer.stride(), strict=True))
    return int((buffer.storage_offset() + extent) * buffer.element_size())
