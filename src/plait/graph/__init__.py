"""Model capture: op graph, parameters and the layer view of a model on fake tensors."""

from plait.graph.capture import capture
from plait.graph.joint import JointGraph, JointNode, JointRef, capture_joint
from plait.graph.model_graph import DTYPE_BYTES, LayerInfo, ModelGraph, OpNode, ParamInfo, TensorMeta
from plait.graph.repeats import Repeats

__all__ = [
    "DTYPE_BYTES",
    "JointGraph",
    "JointNode",
    "JointRef",
    "LayerInfo",
    "ModelGraph",
    "OpNode",
    "ParamInfo",
    "Repeats",
    "TensorMeta",
    "capture",
    "capture_joint",
]
