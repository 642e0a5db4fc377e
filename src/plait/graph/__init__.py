"""Model capture: op graph, parameters and the layer view of a model on fake tensors."""

from plait.graph.capture import capture
from plait.graph.model_graph import DTYPE_BYTES, LayerInfo, ModelGraph, OpNode, ParamInfo, TensorMeta

__all__ = ["DTYPE_BYTES", "LayerInfo", "ModelGraph", "OpNode", "ParamInfo", "TensorMeta", "capture"]
