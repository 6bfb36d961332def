"""RCFG: the residual-noise algebra, NFE per variant, and self-negative needing an init image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from guidance_steps import predictions, step_context
from PIL import Image

from accel_diffusion.engine import generate
from accel_diffusion.errors import IncompatibleStrategyError
from accel_diffusion.guidance.rcfg import RcfgGuidance
from accel_diffusion.strategy import GenerationRequest


def test_self_negative_residual_is_the_noise_explaining_x_t_from_the_input() -> None:
    step, preds = step_context(), predictions()
    reference = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    rcfg = RcfgGuidance(scale=3.0, delta=0.7, variant="self")
    rcfg.begin(reference)
    eps_bar = (step.model_input - step.alpha * reference) / step.sigma
    expected = 0.7 * eps_bar + 3.0 * (preds["cond"] - 0.7 * eps_bar)
    assert rcfg.branches(step) == ("cond",)
    assert torch.allclose(rcfg.combine({"cond": preds["cond"]}, step), expected, atol=1e-5)


def test_onetime_negative_uses_its_first_prediction_as_reference() -> None:
    rcfg = RcfgGuidance(scale=2.0, delta=1.0, variant="onetime")
    rcfg.begin(None)
    first, preds = step_context(timestep=801, index=0), predictions()
    assert rcfg.branches(first) == ("uncond", "cond")
    out = rcfg.combine(preds, first)  # at the first step the residual noise is the negative prediction
    assert torch.allclose(out, preds["uncond"] + 2.0 * (preds["cond"] - preds["uncond"]), atol=1e-5)
    later = step_context(timestep=401, index=1, seed=9)
    assert rcfg.branches(later) == ("cond",)
    x0_neg = first.predicted_x0(preds["uncond"])
    eps_bar = (later.model_input - later.alpha * x0_neg) / later.sigma
    assert torch.allclose(rcfg.combine({"cond": preds["cond"]}, later),
                          eps_bar + 2.0 * (preds["cond"] - eps_bar), atol=1e-4)


def test_v_prediction_round_trips_through_noise_space() -> None:
    step, preds = step_context("v_prediction"), predictions()
    rcfg = RcfgGuidance(scale=1.0, delta=1.0, variant="self")  # scale 1: the conditional prediction back
    rcfg.begin(torch.zeros(2, 4, 8, 8))
    assert torch.allclose(rcfg.combine({"cond": preds["cond"]}, step), preds["cond"], atol=1e-4)


def _init() -> Image.Image:
    return Image.fromarray(np.tile(np.arange(32, dtype=np.uint8)[:, None, None] * 8, (1, 32, 3)))


@pytest.mark.parametrize(("guidance", "nfe"), [
    ({"name": "rcfg", "variant": "self", "scale": 2.0}, 6),       # 1 per step
    ({"name": "rcfg", "variant": "onetime", "scale": 2.0}, 7),    # 1 per step + 1
    ({"name": "cfg", "scale": 2.0}, 12),                           # 2 per step
    ({"name": "rcfg", "variant": "onetime", "scale": 1.0}, 6),    # scale 1: the cond prediction, no negative
])
def test_nfe_per_method_in_img2img(tiny_sd, guidance: dict, nfe: int) -> None:
    request = GenerationRequest.create(model="tiny-sd", prompt="a cross", seed=1, steps=8, strength=0.75,
                                       init_image=_init(), strategy={"guidance": guidance})
    result = generate(tiny_sd, request)
    assert result.steps == 6 and result.nfe == nfe and np.isfinite(result.images).all()


def test_onetime_works_in_txt2img_and_self_needs_an_init_image(tiny_sd) -> None:
    onetime = generate(tiny_sd, GenerationRequest.create(
        model="tiny-sd", prompt="a cross", seed=1, steps=5,
        strategy={"guidance": {"name": "rcfg", "variant": "onetime"}}))
    assert onetime.nfe == 6
    with pytest.raises(IncompatibleStrategyError) as err:
        generate(tiny_sd, GenerationRequest.create(model="tiny-sd", prompt="a cross", steps=5,
                                                   strategy={"guidance": {"name": "rcfg", "variant": "self"}}))
    assert err.value.field == "strategy.guidance.variant"


def test_rcfg_at_scale_1_is_the_conditional_prediction(tiny_sd) -> None:
    def run(guidance: dict) -> np.ndarray:
        return generate(tiny_sd, GenerationRequest.create(
            model="tiny-sd", prompt="a cross", seed=1, steps=8, strength=0.75, init_image=_init(),
            strategy={"guidance": guidance})).images

    plain = run({"name": "none"})
    for variant in ("self", "onetime"):
        assert (run({"name": "rcfg", "variant": variant, "scale": 1.0}) == plain).all(), variant
