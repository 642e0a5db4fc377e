"""The profile format: JSON round trip, atomic save, packaged profiles and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from costkit import alpha_beta_table, cpu_profile

from plait.cluster import load_cluster, local_cluster
from plait.cost import CostModel
from plait.cost.profile import (
    PROFILE_VERSION,
    ProfileError,
    load_profile,
    packaged_profile_names,
    profile_from_json,
    profile_to_json,
    save_profile,
)
from plait.errors import PlaitError


def test_round_trip_through_a_file(tmp_path: Path) -> None:
    profile = cpu_profile(collectives=alpha_beta_table("all_reduce", 2, 1e-4, 1e-9, (4096, 65536)))
    path = save_profile(profile, tmp_path / "sub" / "p.json")
    assert load_profile(path) == profile
    assert load_profile(str(path)) == profile
    assert [p.name for p in path.parent.iterdir()] == ["p.json"]  # no temporary file left behind
    raw = json.loads(path.read_text())
    assert raw["format"] == "plait-profile" and raw["version"] == PROFILE_VERSION


def test_save_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text("old")
    save_profile(cpu_profile(), path)
    assert load_profile(path) == cpu_profile()


def test_packaged_h200_profile() -> None:
    assert "h200" in packaged_profile_names()
    profile = load_profile("h200")
    assert profile.device.kind == "cuda" and "H200" in profile.device.name
    assert set(profile.dtypes()) == {"bf16", "fp32", "tf32"}
    assert CostModel(load_cluster("h200:1")).profile == profile


def test_missing_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="does not exist.*plait profile --out"):
        load_profile(tmp_path / "nope.json")


def test_unknown_packaged_name_lists_the_known_ones() -> None:
    with pytest.raises(ProfileError, match="unknown packaged profile 'h900'.*h200"):
        load_profile("h900")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"a": 1}', "not a plait profile"),
        ('{"format": "plait-profile", "version": 99}', "version 99.*reads version 1"),
        ('{"format": "plait-profile", "version": 1, "device": 3}', "does not match the profile format"),
    ],
)
def test_corrupt_files_give_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, PlaitError)


def test_non_positive_numbers_are_rejected() -> None:
    raw = json.loads(profile_to_json(cpu_profile()))
    raw["rates"][0]["kernel_s"] = 0
    with pytest.raises(ProfileError, match="concurrency 1 need positive values"):
        profile_from_json(json.dumps(raw))


def test_local_cluster_picks_up_the_default_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "profile-local.json"
    monkeypatch.setenv("PLAIT_PROFILE", str(path))
    assert CostModel(local_cluster(2)).profile is None
    save_profile(cpu_profile(), path)
    assert CostModel(local_cluster(2)).profile == cpu_profile()


def test_profile_of_another_device_kind_is_refused() -> None:
    with pytest.raises(ProfileError, match="cannot calibrate cluster local:2 of cpu devices"):
        CostModel(local_cluster(2), "h200")


CLUSTER_YAML = """
num_nodes: 1
devices_per_node: {n}
device: {{name: X, kind: {kind}, peak_tflops: {{fp32: 67, bf16: 989}}, memory_gb: 80, memory_bandwidth_gb_s: 3000}}
links: {{intra_node: {{latency_us: 6, bandwidth_gb_s: 450}}}}
profile: {profile}
"""


def test_cluster_files_name_packaged_profiles_or_files_beside_them(tmp_path: Path) -> None:
    (tmp_path / "gpu.yaml").write_text(CLUSTER_YAML.format(n=1, kind="cuda", profile="h200"))
    assert CostModel(load_cluster(tmp_path / "gpu.yaml")).profile == load_profile("h200")
    save_profile(cpu_profile(), tmp_path / "profiles" / "mine.json")
    (tmp_path / "cpu.yaml").write_text(CLUSTER_YAML.format(n=2, kind="cpu", profile="profiles/mine.json"))
    assert CostModel(load_cluster(tmp_path / "cpu.yaml")).profile == cpu_profile()
