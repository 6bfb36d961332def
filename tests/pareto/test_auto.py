"""``"strategy": "auto"``: request validation, resolution under budgets, the refusals, and the engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pareto_fixtures import make_profile, write_profile
from PIL import Image

from accel_diffusion.engine import Engine
from accel_diffusion.errors import InvalidRequestError
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.pareto import profile as profile_module
from accel_diffusion.pareto.auto import choose_point, resolve_auto
from accel_diffusion.pareto.profile import device_key, use_profiles_dir
from accel_diffusion.strategy import GenerationRequest, Strategy


@pytest.fixture
def profiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(profile_module.PROFILES_DIR_ENV, raising=False)
    monkeypatch.setattr(profile_module, "BUILTIN_PROFILES_DIR", tmp_path / "none")
    use_profiles_dir(tmp_path)
    write_profile(tmp_path, make_profile("shapes", device_key("cpu")))
    yield tmp_path
    use_profiles_dir(None)


def auto_request(**fields) -> GenerationRequest:
    return GenerationRequest.create(**{"model": "shapes", "prompt": "a red circle on a blue background", "seed": 3,
                                       "strategy": "auto", **fields})


def test_auto_parses_and_carries_no_components() -> None:
    assert Strategy.parse("auto").is_auto and Strategy.parse(" auto ").auto is True
    with pytest.raises(InvalidRequestError, match="chooses every component") as err:
        Strategy.parse({"auto": True, "sampler": {"name": "ddim"}})
    assert err.value.field.startswith("strategy")


@pytest.mark.parametrize(("fields", "named"), [
    ({}, "latency_budget_ms"),  # auto needs a budget
    ({"latency_budget_ms": 50, "steps": 4}, "steps"),
    ({"latency_budget_ms": 50, "init_image": Image.new("RGB", (32, 32))}, "init_image"),
    ({"latency_budget_ms": 50, "vae": "tiny"}, "vae"),
    ({"latency_budget_ms": 0}, "latency_budget_ms"),
])
def test_auto_requests_are_checked_at_the_edge(fields: dict, named: str) -> None:
    with pytest.raises(InvalidRequestError, match=r"auto|greater than 0") as err:
        auto_request(**fields)
    assert err.value.field == named


def test_a_budget_without_auto_is_refused() -> None:
    for name in ("latency_budget_ms", "min_quality"):
        with pytest.raises(InvalidRequestError, match="only used with") as err:
            GenerationRequest.create(prompt="x", **{name: 50})
        assert err.value.field == name


def test_resolution_takes_the_best_front_point_that_fits(profiles: Path) -> None:
    cases = {12.0: (2, "dpmpp_2m", 0.40), 29.9: (2, "dpmpp_2m", 0.40), 30.0: (4, "ghvb", 0.77),
             100.0: (8, "ddim", 0.95), 1e6: (25, "dpmpp_2m", 0.99)}
    for budget, (steps, sampler, quality) in cases.items():
        resolved = resolve_auto(auto_request(latency_budget_ms=budget), "cpu")
        assert (resolved.steps, resolved.strategy.sampler["name"]) == (steps, sampler), budget
        record = resolved.strategy.auto
        assert record["expected_quality"] == quality and record["latency_budget_ms"] == budget
        assert record["latency_at_batch"] == 1 and record["profile"] == f"shapes@{device_key('cpu')}.json"
        assert not resolved.strategy.is_auto  # concrete now: the engine runs it as any strategy
    # several images: the per-image latency at the profile's batch size decides
    many = resolve_auto(auto_request(latency_budget_ms=10, n=4), "cpu")
    assert many.steps == 8 and many.strategy.auto["latency_at_batch"] == 16
    # min_quality rules out cheaper points
    assert resolve_auto(auto_request(latency_budget_ms=1e6, min_quality=0.9), "cpu").steps == 25
    assert resolve_auto(auto_request(latency_budget_ms=60, min_quality=0.9), "cpu").steps == 8


def test_nothing_fits_names_the_budget_or_min_quality_with_the_numbers(profiles: Path) -> None:
    with pytest.raises(InvalidRequestError, match=r"the fastest takes 12\.0 ms") as err:
        resolve_auto(auto_request(latency_budget_ms=5), "cpu")
    assert err.value.field == "latency_budget_ms"
    with pytest.raises(InvalidRequestError, match=r"0\.77") as err:
        resolve_auto(auto_request(latency_budget_ms=40, min_quality=0.9), "cpu")
    assert err.value.field == "min_quality"


def test_no_profile_for_this_device_or_size_is_a_clear_refusal(profiles: Path) -> None:
    with pytest.raises(InvalidRequestError, match="bench pareto --model shapes") as err:
        resolve_auto(auto_request(latency_budget_ms=50), "meta")
    assert err.value.field == "strategy"
    with pytest.raises(InvalidRequestError, match="measured at 32x32") as err:
        resolve_auto(auto_request(latency_budget_ms=50, width=64), "cpu")
    assert err.value.field == "width"


def test_a_student_point_is_chosen_only_where_the_student_is_served(profiles: Path) -> None:
    write_profile(profiles, make_profile("shapes", device_key("cpu"), student=("shapes_student", 0.97, 8.0)))
    request = auto_request(latency_budget_ms=20)
    chosen = resolve_auto(request, "cpu", models=["shapes", "shapes_student"])
    assert (chosen.model, chosen.steps, chosen.strategy.auto["expected_quality"]) == ("shapes_student", 1, 0.97)
    assert resolve_auto(request, "cpu", models=["shapes"]).model == "shapes"
    profile = make_profile("shapes", "x", student=("shapes_student", 0.97, 8.0))
    assert profile.points[choose_point(profile, 20, models=["shapes"])].steps == 2


def test_the_engine_runs_the_chosen_strategy_and_echoes_it(profiles: Path) -> None:
    engine = Engine(ModelRegistry.default())
    result = engine.generate(auto_request(latency_budget_ms=40))
    assert result.steps == 4 and result.nfe == 8  # GHVB 0.8, 4 steps with CFG
    echoed = result.summary()["strategy"]
    assert echoed["sampler"]["name"] == "ghvb" and echoed["auto"]["expected_latency_ms"] == 30.0
    explicit = engine.generate(GenerationRequest.create(
        model="shapes", prompt="a red circle on a blue background", seed=3, steps=4,
        strategy={"sampler": {"name": "ghvb", "order": 0.8}, "schedule": {"name": "karras", "rho": 3.0},
                  "guidance": {"name": "cfg", "scale": 5.0}}))
    assert np.array_equal(result.images, explicit.images)
