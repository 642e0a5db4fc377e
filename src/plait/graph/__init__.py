"""Model capture: op graph, parameters and the layer view of a model on the meta device."""

from plait.graph.model_graph import DTYPE_BYTES, LayerInfo, ModelGraph, OpNode, ParamInfo, TensorMeta

__all__ = ["DTYPE_BYTES", "LayerInfo", "ModelGraph", "OpNode", "ParamInfo", "TensorMeta"]
