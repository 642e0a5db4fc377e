"""Cluster descriptions: presets, YAML files and this machine."""

from plait.cluster.load import cluster_from_dict, load_cluster, preset_names
from plait.cluster.local import default_profile_path, local_cluster
from plait.cluster.spec import Cluster, DeviceSpec, LinkSpec

__all__ = [
    "Cluster",
    "DeviceSpec",
    "LinkSpec",
    "cluster_from_dict",
    "default_profile_path",
    "load_cluster",
    "local_cluster",
    "preset_names",
]
