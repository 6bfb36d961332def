"""The shipped Pareto profiles: each loads, is complete, its front is the front of its own points, every front
point is a request the engine accepts for a served model, and ``GET /v1/models`` shows the ``shapes`` front to a
server whose ``profile_device`` is the profile's device (any machine: the key names the device measured)."""

from __future__ import annotations

from pathlib import Path

import pytest
from accel_diffusion.server import create_app
from fastapi.testclient import TestClient
from server_clients import make_settings

from accel_diffusion.engine.engine import check_request
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.pareto.auto import choose_point
from accel_diffusion.pareto.profile import BUILTIN_PROFILES_DIR, ParetoProfile
from accel_diffusion.strategy import GenerationRequest

SHIPPED = sorted(BUILTIN_PROFILES_DIR.glob("*.json"))
SHAPES_CPU = BUILTIN_PROFILES_DIR / "shapes@cpu-x86-64-2t.json"


def test_the_shapes_profile_is_shipped() -> None:
    assert SHAPES_CPU in SHIPPED


def test_the_ar_model_profile_is_shipped_with_its_ar_iterations() -> None:
    profile = ParetoProfile.load(BUILTIN_PROFILES_DIR / "shapes_mar@cpu-x86-64-2t.json")
    assert {p.model for p in profile.points} == {"shapes_mar"}
    assert all(p.ar_iterations is not None for p in profile.points)
    registry = ModelRegistry.default()
    steps = registry.spec("shapes_mar").default_steps
    iterations = registry.get("shapes_mar").pipeline.config["default_ar_iterations"]
    anchor = [p for p in profile.points if p.steps == steps and p.ar_iterations == iterations
              and p.strategy["schedule"]["name"] == "spacing"]
    assert len(anchor) == 1 and anchor[0].metrics["paired_distance"] == 0.0  # the model's default: the reference


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_a_shipped_profile_is_complete_and_its_front_is_its_points_front(path: Path) -> None:
    profile = ParetoProfile.load(path)
    assert profile.complete and path.name == profile.file_name
    assert profile.front == profile.compute_front() and profile.front
    # every candidate is either measured or pruned with its reason
    assert all(s["reason"] for s in profile.skipped)
    assert len({p.key() for p in profile.points} & {s["key"] for s in profile.skipped}) == 0


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_front_point_of_a_shipped_profile_is_a_valid_request(path: Path) -> None:
    profile = ParetoProfile.load(path)
    registry = ModelRegistry.default()
    for point in profile.front_points():
        request = GenerationRequest.create(model=point.model, prompt="a red circle on a blue background",
                                           strategy=point.strategy or None, **point.request_fields())
        check_request(registry.spec(point.model), request)


def test_the_shapes_front_resolves_budgets_as_measured() -> None:
    """What `auto` picks on this profile at the benchmark's budgets (docs/benchmarks.md, Pareto): the front is
    monotone, so a larger budget never picks a lower quality."""
    profile = ParetoProfile.load(SHAPES_CPU)
    served = {p.model for p in profile.points}
    chosen = [profile.points[choose_point(profile, budget, models=served)] for budget in (50, 100, 300, 1e6)]
    assert [c.quality for c in chosen] == sorted(c.quality for c in chosen)
    assert all(c.latency_ms <= budget for c, budget in zip(chosen, (50, 100, 300, 1e6)))
    assert chosen[-1].quality == max(p.quality for p in profile.points)


def test_models_route_shows_the_shipped_shapes_front() -> None:
    profile = ParetoProfile.load(SHAPES_CPU)
    settings = make_settings(None, served_models=["shapes"], profile_device=profile.device)
    with TestClient(create_app(settings)) as client:
        row = client.get("/v1/models").json()["data"][0]
    front = row["pareto_front"]
    assert row["id"] == "shapes" and front["profile"] == SHAPES_CPU.name and front["device"] == profile.device
    assert [(p["latency_ms"], p["quality"]) for p in front["points"]] == [
        (p.latency_ms, p.quality) for p in profile.front_points()]
