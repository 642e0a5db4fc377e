"""Load a cluster from a YAML file or a preset name such as ``dgx-a100:2`` or ``local:4``."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from plait.cluster.local import local_cluster
from plait.cluster.spec import Cluster, DeviceSpec, LinkSpec
from plait.errors import ClusterSpecError

GB = 1e9

_DEVICE_KEYS = {"name", "kind", "peak_tflops", "memory_gb", "memory_bandwidth_gb_s"}
_LINK_KEYS = {"latency_us", "bandwidth_gb_s"}
_TOP_KEYS = {"name", "num_nodes", "devices_per_node", "device", "links", "profile", "source", "notes"}


def preset_names() -> list[str]:
    """Names of the packaged presets, as written after ``--cluster`` (``NAME:K``)."""
    names = [p.name.removesuffix(".yaml") for p in resources.files("plait.cluster.presets").iterdir()]
    return sorted([n for n in names if not n.startswith("_")] + ["local"])


def load_cluster(spec: str | os.PathLike[str]) -> Cluster:
    """Load a cluster from a YAML path or a preset ``NAME:K`` (K nodes; ``local:N`` is N CPU ranks here)."""
    text = os.fspath(spec)
    if text.endswith((".yaml", ".yml")) or os.path.sep in text:
        path = Path(text)
        if not path.is_file():
            raise ClusterSpecError(f"cluster file {path} does not exist")
        return _from_yaml_file(path)
    return _from_preset(text)


def _from_preset(text: str) -> Cluster:
    name, _, count_text = text.partition(":")
    known = preset_names()
    if name not in known:
        raise ClusterSpecError(
            f"unknown cluster preset {name!r}; known presets: {', '.join(known)} "
            "(write NAME:K for K nodes, e.g. dgx-a100:2, or give a cluster YAML file)"
        )
    count = 1
    if count_text:
        if not count_text.isdigit() or int(count_text) < 1:
            raise ClusterSpecError(f"{text!r}: the count after ':' must be a positive integer, e.g. {name}:2")
        count = int(count_text)
    if name == "local":
        return local_cluster(count)
    raw = yaml.safe_load(resources.files("plait.cluster.presets").joinpath(f"{name}.yaml").read_text())
    raw["num_nodes"] = count
    raw["name"] = f"{name}:{count}"
    return cluster_from_dict(raw, where=f"preset {name}")


def _from_yaml_file(path: Path) -> Cluster:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ClusterSpecError(f"cluster file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ClusterSpecError(f"cluster file {path} must hold a mapping with keys {sorted(_TOP_KEYS)}")
    raw.setdefault("name", path.stem)
    cluster = cluster_from_dict(raw, where=str(path))
    # A relative profile path is relative to the YAML file; a bare name (``h200``) is a packaged profile.
    is_path = cluster.profile is not None and (cluster.profile.endswith(".json") or "/" in cluster.profile)
    if cluster.profile and is_path and not os.path.isabs(cluster.profile):
        resolved = str((path.parent / cluster.profile).resolve())
        cluster = Cluster(**{**cluster.__dict__, "profile": resolved})
    return cluster


def cluster_from_dict(raw: dict[str, Any], *, where: str) -> Cluster:
    """Validate the YAML form of a cluster and build it; errors name the file and the key."""
    _check_keys(raw, _TOP_KEYS, {"num_nodes", "devices_per_node", "device", "links"}, where)
    device = raw["device"]
    _check_keys(device, _DEVICE_KEYS, _DEVICE_KEYS, f"{where}: device")
    links = raw["links"]
    _check_keys(links, {"intra_node", "inter_node"}, {"intra_node"}, f"{where}: links")
    tflops = device["peak_tflops"]
    if not isinstance(tflops, dict) or "fp32" not in tflops:
        raise ClusterSpecError(f"{where}: device.peak_tflops must map dtypes to TFLOP/s and include fp32")
    intra = _link(links["intra_node"], f"{where}: links.intra_node")
    inter = _link(links.get("inter_node", links["intra_node"]), f"{where}: links.inter_node")
    return Cluster(
        name=str(raw["name"]),
        num_nodes=_positive_int(raw["num_nodes"], f"{where}: num_nodes"),
        devices_per_node=_positive_int(raw["devices_per_node"], f"{where}: devices_per_node"),
        device=DeviceSpec(
            name=str(device["name"]),
            kind=_kind(device["kind"], where),
            peak_flops={str(k): _positive(v, f"{where}: peak_tflops.{k}") * 1e12 for k, v in tflops.items()},
            memory_bytes=int(_positive(device["memory_gb"], f"{where}: device.memory_gb") * GB),
            memory_bandwidth=_positive(device["memory_bandwidth_gb_s"], f"{where}: memory_bandwidth_gb_s") * GB,
        ),
        intra_node=intra,
        inter_node=inter,
        profile=raw.get("profile"),
        source=str(raw.get("source", "")),
        notes=tuple(raw.get("notes", ())),
    )


def _link(raw: Any, where: str) -> LinkSpec:
    _check_keys(raw, _LINK_KEYS, _LINK_KEYS, where)
    return LinkSpec(
        latency_s=_positive(raw["latency_us"], f"{where}.latency_us") * 1e-6,
        bandwidth=_positive(raw["bandwidth_gb_s"], f"{where}.bandwidth_gb_s") * GB,
    )


def _check_keys(raw: Any, allowed: set[str], required: set[str], where: str) -> None:
    if not isinstance(raw, dict):
        raise ClusterSpecError(f"{where}: expected a mapping with keys {sorted(allowed)}, got {raw!r}")
    unknown = set(raw) - allowed
    if unknown:
        raise ClusterSpecError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    missing = required - set(raw)
    if missing:
        raise ClusterSpecError(f"{where}: missing key(s) {sorted(missing)}")


def _positive(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ClusterSpecError(f"{where} must be a positive number, got {value!r}")
    return float(value)


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ClusterSpecError(f"{where} must be a positive integer, got {value!r}")
    return value


def _kind(value: Any, where: str) -> Any:
    if value not in ("cuda", "cpu"):
        raise ClusterSpecError(f"{where}: device.kind must be 'cuda' or 'cpu', got {value!r}")
    return value
