"""ModelGraph: what capture learns about a model (op graph, parameters, ordered layers)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8, "int64": 8, "int32": 4, "bool": 1, "int8": 1, "uint8": 1}


@dataclass(frozen=True, kw_only=True)
class TensorMeta:
    """Shape and dtype of one tensor."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        return self.numel * DTYPE_BYTES.get(self.dtype, 4)


@dataclass(frozen=True, kw_only=True)
class OpNode:
    """One aten op of the forward graph, with the module it came from."""

    name: str
    target: str  # e.g. "aten.mm.default"
    module: str  # fully qualified name of the innermost module that called it ("" for the root)
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]
    flops: int  # forward FLOPs of this op
    layer: int = -1  # index into ModelGraph.layers (ops outside every layer: the layer that ran before)
    input_nodes: tuple[str, ...] = ()  # producing ops' names; parameters and buffers by their FQN


@dataclass(frozen=True, kw_only=True)
class ParamInfo:
    """One parameter: where it lives, its size and the layer that owns it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    layer: int  # index into ModelGraph.layers

    @property
    def numel(self) -> int:
        """Number of elements."""
        return TensorMeta(shape=self.shape, dtype=self.dtype).numel

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        return TensorMeta(shape=self.shape, dtype=self.dtype).nbytes


@dataclass(frozen=True, kw_only=True)
class LayerInfo:
    """One block of the layer view, measured at the captured batch size."""

    index: int
    name: str  # module FQN, e.g. "blocks.3"
    kind: str  # module class name
    fwd_flops: int
    bwd_flops: int
    num_params: int
    param_bytes: int
    activation_bytes: int  # tensors saved for backward inside this layer
    output_bytes: int  # boundary tensor(s) passed to the next layer
    output_shape: tuple[int, ...]
    fwd_bytes_moved: int  # memory traffic of the forward ops (inputs + outputs), for the roofline
    num_kernels: int  # forward aten ops, for the per-kernel overhead
    # The most bytes the layer's backward holds at once above what was live when it began (the gradient of its
    # output), besides its saved activations: gradients of activations (its input's too), taken to scale with
    # the batch like activation_bytes, and fresh parameter gradients before they are added into the
    # parameters', which do not.
    bwd_workspace_bytes: int = 0
    bwd_param_grad_bytes: int = 0


@dataclass(frozen=True, kw_only=True)
class ModelGraph:
    """A captured model: op graph, parameters and the ordered layer view."""

    name: str
    dtype: str
    batch_size: int  # leading dim of the example inputs; per-layer costs scale linearly with it
    input_shapes: tuple[tuple[int, ...], ...]
    layers: tuple[LayerInfo, ...]
    params: tuple[ParamInfo, ...]
    ops: tuple[OpNode, ...] = ()
    buffer_bytes: int = 0
    # The joint forward+backward ATen graph (capture(with_joint=True)); never compared, printed or serialised.
    joint: JointGraph | None = field(default=None, compare=False, repr=False, metadata={"json": False})

    @property
    def num_params(self) -> int:
        """Total number of parameter elements."""
        return sum(p.numel for p in self.params)

    @property
    def param_bytes(self) -> int:
        """Total parameter bytes."""
        return sum(p.nbytes for p in self.params)

    @property
    def fwd_flops(self) -> int:
        """Forward FLOPs at the captured batch."""
        return sum(layer.fwd_flops for layer in self.layers)

    @property
    def bwd_flops(self) -> int:
        """Backward FLOPs at the captured batch."""
        return sum(layer.bwd_flops for layer in self.layers)

    @property
    def activation_bytes(self) -> int:
        """Bytes saved for backward at the captured batch."""
        return sum(layer.activation_bytes for layer in self.layers)

    def params_of(self, layer_index: int) -> tuple[ParamInfo, ...]:
        """Parameters owned by one layer."""
        return tuple(p for p in self.params if p.layer == layer_index)

    def without_ops(self) -> ModelGraph:
        """The same graph without the op list and the joint graph (what a Plan carries)."""
        return replace(self, ops=(), joint=None)


# At the end: joint.py imports TensorMeta from this module, and from_dict needs JointGraph defined here.
from plait.graph.joint import JointGraph  # noqa: E402
