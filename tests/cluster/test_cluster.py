"""Cluster presets and YAML files: numbers, validation and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from plait.cluster import load_cluster, local_cluster, preset_names
from plait.errors import ClusterSpecError


@pytest.mark.parametrize(
    ("spec", "world", "device", "bf16_tflops"),
    [
        ("dgx-a100:2", 16, "A100-SXM4-80GB", 312),
        ("dgx-h100:8", 64, "H100-SXM5-80GB", 989),
        ("h200:1", 1, "H200-SXM-141GB", 989),
        ("p3.16xlarge:4", 32, "V100-SXM2-16GB", 15.7),
    ],
)
def test_presets_have_datasheet_numbers(spec: str, world: int, device: str, bf16_tflops: float) -> None:
    cluster = load_cluster(spec)
    assert cluster.world_size == world
    assert cluster.device.name == device
    assert cluster.device.flops_for("bf16") == pytest.approx(bf16_tflops * 1e12)
    assert cluster.source
    assert cluster.inter_node.bandwidth < cluster.intra_node.bandwidth


def test_local_cluster_divides_this_machine() -> None:
    cluster = load_cluster("local:4")
    assert cluster.world_size == 4 and cluster.num_nodes == 1
    assert cluster.device.kind == "cpu"
    assert cluster.device.memory_bytes * 4 <= local_cluster(1).device.memory_bytes + 4


def test_rank_to_node_and_links() -> None:
    cluster = load_cluster("dgx-a100:2")
    assert [cluster.node_of(r) for r in (0, 7, 8, 15)] == [0, 0, 1, 1]
    assert cluster.link_between((0, 7)) == cluster.intra_node
    assert cluster.link_between((0, 8)) == cluster.inter_node


def test_unknown_preset_lists_known_ones() -> None:
    with pytest.raises(ClusterSpecError) as err:
        load_cluster("tpu-v9:2")
    for name in preset_names():
        assert name in str(err.value)


@pytest.mark.parametrize("spec", ["dgx-a100:0", "dgx-a100:x", "local:-1"])
def test_bad_counts(spec: str) -> None:
    with pytest.raises(ClusterSpecError, match="positive integer"):
        load_cluster(spec)


GOOD_YAML = """
name: lab
num_nodes: 2
devices_per_node: 4
device: {name: X1, kind: cuda, peak_tflops: {fp32: 10, bf16: 100}, memory_gb: 24, memory_bandwidth_gb_s: 900}
links:
  intra_node: {latency_us: 5, bandwidth_gb_s: 100}
  inter_node: {latency_us: 20, bandwidth_gb_s: 12.5}
profile: prof.json
"""


def test_yaml_cluster_loads_and_resolves_profile(tmp_path: Path) -> None:
    path = tmp_path / "lab.yaml"
    path.write_text(GOOD_YAML)
    cluster = load_cluster(path)
    assert cluster.world_size == 8
    assert cluster.device.memory_bytes == 24 * 10**9
    assert cluster.inter_node.latency_s == pytest.approx(20e-6)
    assert cluster.profile == str(tmp_path / "prof.json")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("num_nodes: [1", "not valid YAML"),
        ("- a\n- b", "must hold a mapping"),
        (GOOD_YAML.replace("num_nodes: 2", "num_nodes: two"), "num_nodes must be a positive integer"),
        (GOOD_YAML.replace("memory_gb: 24", "memory_gb: -1"), "memory_gb must be a positive number"),
        (GOOD_YAML.replace("kind: cuda", "kind: tpu"), "device.kind must be"),
        (GOOD_YAML.replace("fp32: 10, ", ""), "include fp32"),
        (GOOD_YAML.replace("profile: prof.json", "profil: x"), "unknown key"),
        (GOOD_YAML.replace("  intra_node: {latency_us: 5, bandwidth_gb_s: 100}\n", ""), "missing key"),
    ],
)
def test_malformed_yaml_names_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ClusterSpecError, match=message) as err:
        load_cluster(path)
    assert "bad.yaml" in str(err.value)


def test_missing_file() -> None:
    with pytest.raises(ClusterSpecError, match="does not exist"):
        load_cluster("no/such/cluster.yaml")
