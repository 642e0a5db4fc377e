"""Non-blocking transfers of token slices between neighbouring pipeline stages (``isend``/``irecv``).

A stage sends each cell's output to the next stage and, in backward, the gradient of each cell's input to the
previous one. A receiver must know a buffer's shape before posting its ``irecv``: a cell's boundary is
``(rows, length, *trailing)``, and the trailing shape and dtype are learned once, from a small header the sender
sends before its first activation (then every cell's receive is posted at once). Gradients need no header: a
stage's output gradient has its output's shape. Each message has its own tag (activations ``1 + k``, gradients
``1 + n + k`` for cell ``k`` of ``n``), so messages never match the wrong receive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from plait.errors import PlaitError
from plait.runtime.token_state import Cell

HEADER_TAG = 0
HEADER_LEN = 10  # dtype index, number of trailing dims, up to 8 trailing dims
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32)


@dataclass
class Pending:
    """A posted receive: its buffer fills once ``wait`` returns."""

    work: dist.Work
    buffer: torch.Tensor

    def wait(self) -> torch.Tensor:
        """The received tensor."""
        self.work.wait()
        return self.buffer


@dataclass
class Links:
    """This stage's neighbours (global ranks, ``None`` at the pipeline's ends) and what it learned of its input."""

    prev: int | None
    next: int | None
    trailing: tuple[int, ...] | None = None  # trailing shape of the input boundary (after rows, tokens)
    dtype: torch.dtype | None = None
    header_sent: bool = False
    sends: list[tuple[dist.Work, torch.Tensor]] = field(default_factory=list)  # in flight (tensors kept alive)

    def send_activation(self, output: torch.Tensor, k: int) -> None:
        """Send cell ``k``'s output on (its header first, the first time)."""
        assert self.next is not None
        data = output.detach().contiguous()
        if not self.header_sent:
            self._isend(_header(data), HEADER_TAG, self.next)
            self.header_sent = True
        self._isend(data, 1 + k, self.next)

    def post_activations(self, cells: Sequence[Cell]) -> list[Pending]:
        """Post the receive of every cell's input (after the header, the first time)."""
        assert self.prev is not None
        if self.trailing is None:
            header = torch.zeros(HEADER_LEN, dtype=torch.int64)
            dist.recv(header, self.prev, tag=HEADER_TAG)
            self.trailing, self.dtype = _read_header(header)
        return [self._irecv((c.rows, c.length, *self.trailing), self.dtype, 1 + k, self.prev)
                for k, c in enumerate(cells)]

    def post_gradients(self, outputs: Sequence[torch.Tensor]) -> list[Pending]:
        """Post the receive of the gradient of every cell's output."""
        assert self.next is not None
        n = len(outputs)
        return [self._irecv(tuple(o.shape), o.dtype, 1 + n + k, self.next) for k, o in enumerate(outputs)]

    def send_gradient(self, grad: torch.Tensor, k: int, n: int) -> None:
        """Send the gradient of cell ``k``'s input back (of ``n`` cells)."""
        assert self.prev is not None
        self._isend(grad.detach().contiguous(), 1 + n + k, self.prev)

    def wait_sends(self) -> None:
        """Wait for every send in flight."""
        for work, _ in self.sends:
            work.wait()
        self.sends.clear()

    def _isend(self, tensor: torch.Tensor, tag: int, dst: int) -> None:
        work = dist.isend(tensor, dst, tag=tag)
        assert work is not None
        self.sends.append((work, tensor))

    @staticmethod
    def _irecv(shape: tuple[int, ...], dtype: torch.dtype | None, tag: int, src: int) -> Pending:
        buffer = torch.empty(shape, dtype=dtype)
        work = dist.irecv(buffer, src, tag=tag)
        assert work is not None
        return Pending(work, buffer)


def _header(data: torch.Tensor) -> torch.Tensor:
    trailing = tuple(data.shape[2:])
    if data.dim() < 2 or len(trailing) > HEADER_LEN - 2 or data.dtype not in DTYPES:
        raise PlaitError(f"a stage output of shape {tuple(data.shape)} and dtype {data.dtype} cannot cross a token "
                         f"pipeline boundary: it needs (rows, tokens, up to 8 more dims) of {DTYPES}")
    values = [DTYPES.index(data.dtype), len(trailing), *trailing]
    return torch.tensor(values + [0] * (HEADER_LEN - len(values)), dtype=torch.int64)


def _read_header(header: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    values = [int(v) for v in header.tolist()]
    return tuple(values[2:2 + values[1]]), DTYPES[values[0]]
