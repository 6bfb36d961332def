"""Every guidance name (cfg, apg, rcfg in each variant, none) means one thing: its output on fixed tensors equals a
reference written from the formulas (tests/component_pins.py), which reproduces values recorded as literals, and its
config round-trips through JSON."""

from __future__ import annotations

import json
import typing

import numpy as np
import pytest
from component_pins import GUIDANCE_DEFAULTS, GUIDANCE_GOLDEN, GUIDANCE_PINS, guidance_reference, guidance_run, summary

from accel_diffusion.registry import get_registry


def test_every_guidance_name_and_choice_is_pinned() -> None:
    """Adding a guidance name, an RCFG variant or an APG space / norm without a pin fails here."""
    registry = get_registry()
    names = set(registry.names("guidance"))
    assert {spec["name"] for spec, *_ in GUIDANCE_PINS.values()} == names == set(GUIDANCE_DEFAULTS)
    assert set(GUIDANCE_PINS) == set(GUIDANCE_GOLDEN)
    for name, field in [("rcfg", "variant"), ("apg", "space"), ("apg", "norm")]:
        choices = typing.get_args(registry.info("guidance", name).config_model.model_fields[field].annotation)
        pinned = {registry.normalize("guidance", spec)[field] for spec, *_ in GUIDANCE_PINS.values()
                  if spec["name"] == name}
        assert pinned == set(choices), (name, field)
    assert {prediction_type for _, prediction_type, _, _ in GUIDANCE_PINS.values()} == {"epsilon", "v_prediction"}


@pytest.mark.parametrize("label", list(GUIDANCE_PINS))
def test_the_reference_gives_the_recorded_golden_values(label: str) -> None:
    for step, (output, (mean_abs, first)) in enumerate(zip(guidance_reference(label), GUIDANCE_GOLDEN[label],
                                                           strict=True)):
        got_mean, got_first = summary(output)
        assert got_mean == pytest.approx(mean_abs, rel=1e-9), step
        assert got_first == pytest.approx(first, rel=1e-9), step


@pytest.mark.parametrize("label", list(GUIDANCE_PINS))
def test_the_component_equals_the_reference_step_after_step(label: str) -> None:
    """Same branches (so the same NFE), and the same outputs to float32 rounding (measured: at most 7.3e-7 of the
    largest value; allowed: 5e-6), through the component's state over the steps."""
    expected_branches = GUIDANCE_PINS[label][3]
    runs = guidance_run(label)
    assert [branches for branches, _ in runs] == expected_branches
    for step, ((_, output), reference) in enumerate(zip(runs, guidance_reference(label), strict=True)):
        np.testing.assert_allclose(output.double().numpy(), reference, rtol=1e-5,
                                   atol=5e-6 * np.abs(reference).max(), err_msg=f"{label} step {step}")


def test_apg_with_eta_one_no_threshold_and_no_momentum_is_cfg() -> None:
    """The paper's CFG limit, between two independently recorded sets of golden values."""
    for apg, cfg in zip(GUIDANCE_GOLDEN["apg-cfg-limit"], GUIDANCE_GOLDEN["cfg"], strict=True):
        assert apg[0] == pytest.approx(cfg[0], rel=1e-12) and apg[1] == pytest.approx(cfg[1], rel=1e-12)


@pytest.mark.parametrize("name", sorted(GUIDANCE_DEFAULTS))
def test_a_bare_name_means_its_pinned_defaults_and_every_pinned_config_round_trips(name: str) -> None:
    registry = get_registry()
    assert registry.normalize("guidance", name) == GUIDANCE_DEFAULTS[name]
    for spec, *_ in [pin for pin in GUIDANCE_PINS.values() if pin[0]["name"] == name]:
        normalized = registry.normalize("guidance", spec)
        assert normalized == GUIDANCE_DEFAULTS[name] | spec
        assert registry.normalize("guidance", json.loads(json.dumps(normalized))) == normalized
        built = registry.build("guidance", json.loads(json.dumps(normalized)))
        assert {key: getattr(built, key) for key in normalized if key != "name"} == {
            key: value for key, value in normalized.items() if key != "name"}
