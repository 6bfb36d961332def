"""What each sampler name means, pinned against references the test builds itself.

The diffusers-backed samplers: the component's scheduler must equal, key by key, a diffusers
scheduler constructed here from an explicit config (not from the component's output), and one
short run through the engine's loop on the `gmm` oracle must give the numbers of that reference
driven by the test's own loop. accel-diffusion's own samplers (deis, hb, ghvb) have no diffusers
twin at their defaults: their runs are pinned by golden values recorded as literals.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from component_pins import GOLDEN, REFERENCES, component_run, model_scheduler_config, reference, reference_run

from accel_diffusion.registry import get_registry


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_scheduler_config_equals_the_independent_reference_key_by_key(name: str) -> None:
    spec, cls, _, step_kwargs = REFERENCES[name]
    sampler = get_registry().build("sampler", spec)
    built = sampler.make_scheduler(model_scheduler_config(), {})
    expected = reference(name)
    assert type(built) is cls
    # every constructor argument of the class, compared one by one (keys the class does not take, such as
    # the model's zero-SNR flag on DEIS, and diffusers' bookkeeping "_use_default_values" are not config)
    keys = [k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "kwargs")]
    assert len(keys) >= 9
    built_config, expected_config = dict(built.config), dict(expected.config)
    mismatched = {k: (built_config.get(k, "<missing>"), expected_config.get(k, "<missing>")) for k in keys
                  if built_config.get(k, "<missing>") != expected_config.get(k, "<missing>")}
    assert mismatched == {}
    assert sampler.step_kwargs() == step_kwargs


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_a_run_through_the_engine_loop_equals_the_reference_loop(name: str) -> None:
    ours = component_run(name)
    theirs = reference_run(name)
    assert ours.dtype == torch.float64 and ours.shape == (64, 2)
    assert torch.equal(ours, theirs)



@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_a_run_gives_the_recorded_golden_values(name: str) -> None:
    """Pins the reference itself: a diffusers upgrade that changes a solver shows up here."""
    x = reference_run(name)
    mean_abs, first = GOLDEN[name]
    # rel 1e-6: diffusers computes its noise schedule in float32, whose last bits differ between CPUs (AVX2 vs
    # AVX-512 kernels: 1e-8 relative between a 2-core AMD EPYC and an Intel Xeon); a changed solver moves these
    # values by 1e-4 or more (abs 1e-6 for coordinates near 0)
    assert float(x.abs().mean()) == pytest.approx(mean_abs, rel=1e-6)
    assert [float(v) for v in x[0]] == pytest.approx(first, rel=1e-6, abs=1e-6)
