"""The profile file: round trip, versioning, hand edits refused, lookup by model and device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pareto_fixtures import make_profile, write_profile

from accel_diffusion.pareto import profile as profile_module
from accel_diffusion.pareto.profile import (
    PROFILE_FORMAT,
    ParetoProfile,
    ProfileError,
    device_key,
    find_profile,
    list_profiles,
    use_profiles_dir,
)


@pytest.fixture(autouse=True)
def _no_configured_dir(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(profile_module.PROFILES_DIR_ENV, raising=False)
    yield
    use_profiles_dir(None)


def test_round_trip_keeps_every_point_and_the_front(tmp_path: Path) -> None:
    profile = make_profile("shapes", "cpu-x86-64-2t")
    assert profile.front == [0, 1, 2, 3]  # the dominated euler point (index 4) is not on it
    path = write_profile(tmp_path, profile)
    assert path.name == "shapes@cpu-x86-64-2t.json"
    again = ParetoProfile.load(path)
    assert again == profile
    assert json.loads(path.read_text())["format"] == PROFILE_FORMAT


def test_adding_the_same_configuration_replaces_its_measurement() -> None:
    profile = make_profile("shapes", "cpu-x86-64-2t")
    point = profile.points[4].model_copy(update={"quality": 0.999, "latency_ms": 5.0})
    profile.add(point)
    assert len(profile.points) == 5
    assert profile.front_points()[0].quality == 0.999 and profile.front == [4]  # fastest and best: alone


def test_another_format_version_and_a_hand_edited_front_are_refused(tmp_path: Path) -> None:
    path = write_profile(tmp_path, make_profile("shapes", "cpu-x86-64-2t"))
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "format": "accel-diffusion/pareto-profile@0"}))
    with pytest.raises(ProfileError, match="re-run `accel-diffusion bench pareto`"):
        ParetoProfile.load(path)
    path.write_text(json.dumps({**data, "front": [4]}))
    with pytest.raises(ProfileError, match="edited by hand"):
        ParetoProfile.load(path)
    path.write_text("{not json")
    with pytest.raises(ProfileError, match="cannot be read"):
        ParetoProfile.load(path)


def test_device_key_names_the_architecture_and_the_threads() -> None:
    key = device_key("cpu", threads=2)
    assert key.startswith("cpu-") and key.endswith("-2t")
    assert device_key(torch.device("cpu")) == device_key("cpu", threads=torch.get_num_threads())


def test_lookup_prefers_the_configured_folder_and_matches_model_and_device(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    shipped, configured = tmp_path / "shipped", tmp_path / "configured"
    monkeypatch.setattr(profile_module, "BUILTIN_PROFILES_DIR", shipped)
    write_profile(shipped, make_profile("shapes", "cpu-a-2t"))
    write_profile(shipped, make_profile("other", "cpu-a-2t"))
    assert find_profile("shapes", "cpu-a-2t").points[0].quality == 0.40
    assert find_profile("shapes", "cpu-a-4t") is None
    mine = make_profile("shapes", "cpu-a-2t")
    mine.add(mine.points[0].model_copy(update={"quality": 0.5}))
    write_profile(configured, mine)
    use_profiles_dir(configured)
    assert find_profile("shapes", "cpu-a-2t").points[-1].quality == 0.5
    assert [p.model for p in list_profiles("shapes")] == ["shapes"]
    assert sorted(p.model for p in list_profiles()) == ["other", "shapes"]
