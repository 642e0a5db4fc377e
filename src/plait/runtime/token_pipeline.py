"""A token-level pipeline (TeraPipe, ICML'21) on real ranks: stages pass slices of sequences, not whole ones.

The model's layers (its layer view's module names, cut into stages as ``plait.runtime.pipeline`` cuts them) run
as ``ChainStage``s, one stage per rank; the job's ranks form a ``(pp, dp)`` mesh with axes ``("pp", "dp")``:
stage ``p`` holds ranks ``p * dp .. p * dp + dp - 1`` and pipeline replica ``j`` (ranks ``{p * dp + j}``) trains
on the ``j``-th share of the global batch. A replica's batch is cut into cells by a token slicing
``[(micro-batch size, [slice lengths])]`` (``SlicingResult.slices`` of ``plait.planners.token_slicing``).

Each step is a small interpreter (GPipe-like, as TeraPipe runs it): every cell forward in pipeline order
(receive its input, run the stage on it inside ``TokenSlicer.cell``, send its output on with ``isend``), then
every cell backward in reverse order (receive its output's gradient, run its backward with the gradients later
slices sent into its cached keys and values, send its input's gradient back). The last stage computes the
loss of each cell, weighted by the cell's share of the batch's tokens, so the replica's loss and gradients are
those of its whole batch. After the backward the ranks of each stage average their gradients over ``dp``.

With ``tp > 1`` (or a ``StageSharding``) each stage's ranks also form a tensor-parallel submesh: the mesh is
``(pp, dp, tp)`` with axes ``("pp", "dp", "tp")`` (rank ``(p * dp + j) * tp + k``), the stage is the micro-batch
pipeline's ``TensorParallelStage`` (``plait.runtime.pipeline_tp``: DTensor parameters, boundaries crossing as local
pieces between ranks of the same ``(dp, tp)`` coordinate), and each tp rank caches the keys and values of its own
heads (``plait.runtime.token_pipeline_tp``). After the backward, gradients DTensor left as pending sums over
``tp`` are reduced, then the ``dp`` average runs on the local pieces.

Not supported: interleaved stages, Hugging Face models (their blocks do not chain; see ``plait.runtime.token_hf``),
boundaries split on a cell's rows or tokens. Each is refused by ``check_token_pipeline``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from plait.errors import PlaitError
from plait.runtime.pipeline import ChainStage
from plait.runtime.pipeline_tp import StageSharding, tensor_parallel_stage
from plait.runtime.tensor_parallel import reduce_grads_to_placements
from plait.runtime.token_p2p import Links
from plait.runtime.token_pipeline_tp import check_token_tensor_parallel, token_sharding
from plait.runtime.token_slices import Loss, Returns, TokenSlicer, is_hf_model, token_share
from plait.runtime.token_state import Cell, Slicing, token_cells


@dataclass
class TokenPipelineRank:
    """What one rank runs: its stage, the slicing of its replica's batch, its neighbours and its dp group."""

    slicer: TokenSlicer
    stage: nn.Module  # a ChainStage, or with tp its TensorParallelStage
    slicing: Slicing
    loss: Loss
    params: dict[str, nn.Parameter]
    links: Links
    stage_index: int
    num_stages: int
    replica: int
    dp: int
    dp_group: dist.ProcessGroup | None
    mesh: DeviceMesh | None = None  # (pp, dp) with axes ("pp", "dp"); with tp (pp, dp, tp) and "tp"
    tensor_parallel: bool = False  # the stage's parameters are DTensors on the tp axis

    @property
    def first(self) -> bool:
        """This rank runs the first stage (it reads the inputs)."""
        return self.stage_index == 0

    @property
    def last(self) -> bool:
        """This rank runs the last stage (it computes the loss)."""
        return self.stage_index == self.num_stages - 1

    def step(self, batch: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """Forward and backward of this replica's share of the global ``batch`` (``(inputs, targets)``); gradients
        accumulate into the stage's parameters, averaged over its dp ranks; the replica's loss on the last stage."""
        if batch[0].shape[0] % self.dp:
            raise PlaitError(f"a global batch of {batch[0].shape[0]} does not split over {self.dp} replicas")
        inputs, targets = (t.chunk(self.dp)[self.replica] for t in batch[:2])
        cells = token_cells(self.slicing, inputs.shape[0], inputs.shape[1])
        saved, total = self._forward(cells, inputs, targets)
        self._backward(cells, saved)
        self.links.wait_sends()
        if self.tensor_parallel:
            reduce_grads_to_placements(self.stage)
        if self.dp > 1:
            average_grads(list(self.params.values()), self.dp_group, self.dp)
        return total if self.last else None

    def _forward(self, cells: list[Cell], inputs: torch.Tensor, targets: torch.Tensor
                 ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Every cell forward in order; per cell (its input, its output or weighted loss), and the loss."""
        recvs = None if self.first else self.links.post_activations(cells)
        size, seq_len = inputs.shape[0], inputs.shape[1]
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        total = torch.zeros(())
        for k, cell in enumerate(cells):
            if recvs is None:
                x = cell.take(inputs)
            else:
                x = recvs[k].wait()
                x.requires_grad_(x.is_floating_point())
            with self.slicer.cell(cell):
                out = self.stage(x)
            if self.last:
                out = self.loss(Returns(out), (out, cell.take(targets))) * token_share(cell, size, seq_len)
                total = total + out.detach()
            else:
                self.links.send_activation(out, k)
            saved.append((x, out))
        return saved, total

    def _backward(self, cells: list[Cell], saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Every cell backward in reverse order, sending each input's gradient back."""
        n = len(cells)
        grads = None if self.last else self.links.post_gradients([out for _, out in saved])
        for k in reversed(range(n)):
            x, out = saved[k]
            grad = None if grads is None else grads[k].wait()
            self.slicer.backward(cells[k], [out], [grad])
            if not self.first:
                self.links.send_gradient(x.grad if x.grad is not None else torch.zeros_like(x), k, n)
            saved[k] = (x, x)  # drop the cell's graph and output


def build_token_pipeline_rank(model: nn.Module, stage_layers: Sequence[Sequence[str]], *, dp: int, slicing: Slicing,
                              loss: Loss, device: torch.device | None = None, tp: int = 1,
                              sharding: StageSharding | None = None) -> TokenPipelineRank:
    """This rank's part of a token pipeline of ``len(stage_layers)`` stages (``stage_layers[s]``: module names of
    the layer view), each on ``dp`` x ``tp`` ranks (``sharding``: the placements on tp, default all replicated);
    every rank must call it at the same point (it makes the mesh)."""
    device = device or torch.device("cpu")
    pp = len(stage_layers)
    check_token_pipeline(model, stage_layers, dp=dp, world=dist.get_world_size(), slicing=slicing, device=device,
                         tp=tp, sharding=sharding)
    sharding = token_sharding(tp, sharding)
    slicer = TokenSlicer(model)
    shape, axes = ((pp, dp), ("pp", "dp")) if sharding is None else ((pp, dp, tp), ("pp", "dp", "tp"))
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=axes)
    coordinate = tuple(mesh.get_coordinate() or (0,) * len(shape))
    stage, replica = coordinate[0], coordinate[1]

    def rank_at(p: int) -> int | None:
        return int(mesh.mesh[(p, *coordinate[1:])]) if 0 <= p < pp else None

    names = stage_layers[stage]
    chain = ChainStage(model, names)
    module = chain if sharding is None else tensor_parallel_stage(chain, mesh["tp"], sharding, stage, pp)
    params = {n: p for n, p in model.named_parameters() if any(n.startswith(m + ".") for m in names)}
    return TokenPipelineRank(slicer=slicer, stage=module, slicing=slicing, loss=loss, params=params,
                             links=Links(prev=rank_at(stage - 1), next=rank_at(stage + 1)), stage_index=stage,
                             num_stages=pp, replica=replica, dp=dp, dp_group=mesh.get_group("dp"), mesh=mesh,
                             tensor_parallel=sharding is not None)


def check_token_pipeline(model: nn.Module, stage_layers: Sequence[Sequence[str]], *, dp: int, world: int,
                         slicing: Slicing, device: torch.device | None = None, tp: int = 1,
                         sharding: StageSharding | None = None) -> None:
    """``PlaitError`` naming what a token pipeline cannot run: the ranks, the stages, the slicing, the model, the
    tensor parallelism inside its stages."""
    pp = len(stage_layers)
    if pp < 1 or dp < 1 or tp < 1 or pp * dp * tp != world:
        ways = f"{dp} data-parallel" + (f" x {tp} tensor-parallel" if tp != 1 else "")
        raise PlaitError(f"{pp} stages x {ways} ranks need {pp * dp * tp} ranks, the job has {world}")
    if any(not layers for layers in stage_layers):
        raise PlaitError("every token pipeline stage needs at least one layer")
    if device is not None and device.type != "cpu":
        raise PlaitError(f"the token pipeline runs on CPU ranks (gloo) for now, not {device.type}")
    if is_hf_model(model):
        raise PlaitError(f"{type(model).__name__} is a Hugging Face model: it runs token-sliced in one process "
                         f"(TokenSlicer, sliced_step) but not in the token pipeline, whose stages chain the layer "
                         f"view's modules while a Hugging Face model's blocks take masks and positions from its base")
    staged = token_sharding(tp, sharding)
    if staged is not None:
        check_token_tensor_parallel(model, stage_layers, tp, staged)
    lengths = [list(lengths) for _, lengths in slicing] or [[]]
    token_cells(slicing, sum(size for size, _ in slicing), sum(lengths[0]))


def average_grads(params: Sequence[nn.Parameter], group: dist.ProcessGroup | None, size: int) -> None:
    """Average the parameters' gradients over ``group`` (one all-reduce per dtype, flattened together; a DTensor
    gradient's local piece)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad  # to_local shares the memory
            by_dtype.setdefault(grad.dtype, []).append(grad)
    with torch.no_grad():
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=group)
            flat.div_(size)
            for g, piece in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                g.copy_(piece.view_as(g))
