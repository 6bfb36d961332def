"""Component registry: config = constructor arguments, JSON Schema, clear errors."""

from __future__ import annotations

import json
import typing

import pytest

from accel_diffusion.errors import InvalidRequestError, UnknownComponentError
from accel_diffusion.registry import ComponentRegistry, get_registry


def test_builtin_components_registered() -> None:
    registry = get_registry()
    assert registry.names("sampler") == [
        "ddim", "ddpm", "deis", "diffusers_deis", "dpmpp_2m", "euler", "ghvb", "hb", "lcm", "unipc"
    ]
    assert registry.names("schedule") == ["disa", "karras", "searched", "spacing", "timesteps"]
    assert registry.names("guidance") == ["apg", "cfg", "none", "rcfg"]
    assert registry.names("student") == ["one_step"] and registry.names("runtime") == ["patch_parallel"]


def test_normalize_fills_defaults_and_round_trips_json(monkeypatch: pytest.MonkeyPatch) -> None:
    from searched_fixtures import GMM_SEARCHED_ID, gmm_searched_dir

    from accel_diffusion.schedules.searched import SCHEDULES_DIR_ENV

    monkeypatch.setenv(SCHEDULES_DIR_ENV, str(gmm_searched_dir()))
    registry = get_registry()
    for info in registry.all():
        params = {p["name"]: p["default"] for p in info.parameters() if not p["required"]}
        if info.name == "timesteps":
            params["timesteps"] = [999, 500, 1]
        if info.name == "searched":
            params["id"] = GMM_SEARCHED_ID
        spec = registry.normalize(info.kind, {"name": info.name, **params})
        assert spec == registry.normalize(info.kind, json.loads(json.dumps(spec)))
        assert registry.normalize(info.kind, spec) == spec
        built = registry.build(info.kind, spec)
        for key, value in spec.items():
            if key != "name":
                assert getattr(built, key) == value, (info.name, key)


def test_string_shorthand_and_json_schema() -> None:
    registry = get_registry()
    assert registry.normalize("sampler", "ddim") == {"name": "ddim", "eta": 0.0}
    schema = registry.info("guidance", "cfg").json_schema()
    assert schema["title"] == "guidance:cfg"
    assert schema["properties"]["scale"]["minimum"] == 0.0
    assert schema["properties"]["scale"]["default"] == 7.5
    assert schema["additionalProperties"] is False
    order = registry.info("sampler", "dpmpp_2m").json_schema()["properties"]["order"]
    assert order["enum"] == [1, 2, 3]


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(UnknownComponentError) as err:
        get_registry().normalize("sampler", {"name": "dpm++"})
    assert err.value.field == "strategy.sampler.name"
    assert "'ddim'" in err.value.allowed and "'unipc'" in err.value.allowed


def test_unknown_parameter_lists_valid_parameters() -> None:
    with pytest.raises(InvalidRequestError) as err:
        get_registry().normalize("sampler", {"name": "dpmpp_2m", "orderr": 2})
    assert err.value.field == "strategy.sampler.orderr"
    assert err.value.allowed == "order, lower_order_final, final_sigmas_type"


@pytest.mark.parametrize(
    ("spec", "field", "allowed"),
    [
        ({"name": "cfg", "scale": -1}, "strategy.guidance.scale", ">= 0.0 and <= 100.0"),
        ({"name": "cfg", "scale": float("nan")}, "strategy.guidance.scale", None),
        ({"name": "cfg", "scale": "high"}, "strategy.guidance.scale", None),
    ],
)
def test_bad_parameter_values_name_the_field(spec: dict, field: str, allowed: str | None) -> None:
    with pytest.raises(InvalidRequestError) as err:
        get_registry().normalize("guidance", spec)
    assert err.value.field == field
    if allowed:
        assert allowed in str(err.value)


def test_literal_choices_are_listed() -> None:
    with pytest.raises(InvalidRequestError) as err:
        get_registry().normalize("sampler", {"name": "dpmpp_2m", "order": 5})
    assert err.value.field == "strategy.sampler.order"
    assert "1, 2 or 3" in str(err.value)


def test_explicit_timesteps_must_decrease() -> None:
    with pytest.raises(InvalidRequestError) as err:
        get_registry().normalize("schedule", {"name": "timesteps", "timesteps": [10, 500]})
    assert err.value.field == "strategy.schedule.timesteps"
    assert "strictly decreasing" in err.value.message


def test_component_without_typed_args_is_rejected() -> None:
    registry = ComponentRegistry()

    class Bad:
        def __init__(self, *args: int) -> None: ...

    with pytest.raises(TypeError):
        registry.register("sampler", "bad")(Bad)

    class Good:
        """A test component."""

        def __init__(self, k: int = 3) -> None:
            self.k = k

    registry.register("sampler", "good")(Good)
    assert registry.build("sampler", {"name": "good", "k": 4}).k == 4
    with pytest.raises(ValueError, match="already registered"):
        registry.register("sampler", "good")(Good)


def test_every_builtin_sampler_and_schedule_name_is_pinned() -> None:
    """A component name means one thing: each built-in sampler and schedule has a pin in tests/component_pins.py
    (an independent diffusers reference, or golden values), so adding one without a pin fails here."""
    from component_pins import AR_SCHEDULE_PINS, OWN_GOLDEN, REFERENCES, SCHEDULE_PINS

    registry = get_registry()
    assert {spec["name"] for spec, *_ in REFERENCES.values()} | set(OWN_GOLDEN) == set(registry.names("sampler"))
    assert set(OWN_GOLDEN).isdisjoint(spec["name"] for spec, *_ in REFERENCES.values())
    assert {spec["name"] for spec, *_ in SCHEDULE_PINS.values()} | set(AR_SCHEDULE_PINS) == set(
        registry.names("schedule"))
    spacings = {spec.get("spacing", "model") for spec, *_ in SCHEDULE_PINS.values() if spec["name"] == "spacing"}
    assert spacings == set(typing.get_args(registry.info("schedule", "spacing").config_model
                                                       .model_fields["spacing"].annotation))


@pytest.mark.parametrize("name", ["deis", "ghvb", "hb"])
def test_own_samplers_at_their_defaults_give_the_recorded_golden_values(name: str) -> None:
    """deis, hb and ghvb have no diffusers twin at their defaults: a run through the engine's loop on the gmm
    oracle is pinned by values recorded as literals (their diffusers special cases: tests/schedulers)."""
    from component_pins import OWN_GOLDEN, engine_run

    scheduler, x = engine_run({"name": name})
    mean_abs, first = OWN_GOLDEN[name]
    assert len(scheduler.timesteps) == 8
    assert float(x.abs().mean()) == pytest.approx(mean_abs, rel=1e-9)
    assert [float(v) for v in x[0]] == pytest.approx(first, rel=1e-9)
