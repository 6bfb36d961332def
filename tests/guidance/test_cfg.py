"""CFG: the formula, guidance rescale, and the start/stop window (NFE and untouched guided steps)."""

from __future__ import annotations

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from guidance_steps import predictions, step_context

from accel_diffusion.engine.step import StepContext
from accel_diffusion.errors import InvalidRequestError
from accel_diffusion.guidance.cfg import CfgGuidance
from accel_diffusion.registry import get_registry


def test_formula_and_rescale_match_diffusers() -> None:
    preds, step = predictions(), step_context()
    guided = CfgGuidance(scale=6.0).combine(preds, step)
    expected = preds["uncond"] + 6.0 * (preds["cond"] - preds["uncond"])
    assert torch.allclose(guided, expected, atol=1e-6)
    rescaled = CfgGuidance(scale=6.0, rescale=0.7).combine(preds, step)
    assert torch.allclose(rescaled, rescale_noise_cfg(expected, preds["cond"], guidance_rescale=0.7), atol=1e-6)


def test_window_chooses_branches_by_progress() -> None:
    cfg = CfgGuidance(scale=5.0, start=0.2, stop=0.6)
    scheduler = step_context().scheduler
    chosen = [cfg.branches(StepContext(i, 10, torch.tensor(0), torch.zeros(1), torch.zeros(1), scheduler, "epsilon"))
              for i in range(10)]
    assert [len(b) for b in chosen] == [1, 1, 2, 2, 2, 2, 1, 1, 1, 1]
    assert CfgGuidance(scale=1.0).branches(step_context()) == ("cond",)


@pytest.mark.parametrize(("start", "stop", "steps"), [(0.0, 0.5, 25), (0.1, 0.5, 25), (0.13, 0.77, 9), (0.3, 1.0, 7)])
def test_window_steps_match_diffusers_guiders(start: float, stop: float, steps: int) -> None:
    from diffusers.guiders import ClassifierFreeGuidance

    ours = CfgGuidance(scale=5.0, start=start, stop=stop)
    theirs = ClassifierFreeGuidance(guidance_scale=5.0, start=start, stop=stop)
    scheduler = step_context().scheduler
    guided, expected = [], []
    for i in range(steps):
        guided.append(ours.guided(StepContext(i, steps, torch.tensor(0), torch.zeros(1), torch.zeros(1), scheduler,
                                              "epsilon")))
        theirs.set_state(step=i, num_inference_steps=steps, timestep=torch.tensor(0))
        expected.append(theirs._is_cfg_enabled())
    assert guided == expected
    if (start, stop, steps) == (0.0, 0.5, 25):
        assert sum(guided) == 12  # int(12.5): not 13


def test_window_must_be_ordered() -> None:
    with pytest.raises(InvalidRequestError) as err:
        get_registry().normalize("guidance", {"name": "cfg", "start": 0.5, "stop": 0.5})
    assert err.value.field == "strategy.guidance.stop"


def test_window_on_the_engine_keeps_guided_steps_and_saves_nfe(tiny_sd) -> None:
    """Guidance switched off from 60% on: the first 6 steps are exactly full CFG's, NFE drops by 4."""
    from accel_diffusion.engine import GenerationHooks, generate
    from accel_diffusion.strategy import GenerationRequest

    def run(guidance: dict) -> tuple[object, dict[int, object]]:
        previews: dict[int, object] = {}  # the decoded x0 estimate after every step
        request = GenerationRequest.create(model="tiny-sd", prompt="a red circle", seed=3, steps=10,
                                           preview_every=1, strategy={"guidance": guidance})
        result = generate(tiny_sd, request, GenerationHooks(on_preview=lambda k, im: previews.update({k: im})))
        return result, previews

    full, full_steps = run({"name": "cfg", "scale": 5.0})
    window, window_steps = run({"name": "cfg", "scale": 5.0, "stop": 0.6})
    assert full.nfe == 20 and window.nfe == 6 * 2 + 4
    for k in range(1, 7):  # steps 1..6 are guided in both runs: identical
        assert (full_steps[k] == window_steps[k]).all(), k
    assert not (full_steps[7] == window_steps[7]).all()


def test_window_in_img2img_counts_the_steps_that_run(tiny_sd) -> None:
    """strength 0.5 of 10 steps runs 5; stop 0.6 guides int(0.6 * 5) = 3 of them."""
    from PIL import Image

    from accel_diffusion.engine import generate
    from accel_diffusion.strategy import GenerationRequest

    init = Image.new("RGB", (32, 32), (200, 40, 40))
    request = GenerationRequest.create(model="tiny-sd", prompt="a red circle", seed=3, steps=10, init_image=init,
                                       strength=0.5, strategy={"guidance": {"name": "cfg", "scale": 5.0, "stop": 0.6}})
    assert generate(tiny_sd, request).nfe == 3 * 2 + 2
