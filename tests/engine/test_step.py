"""StepContext: the VP coefficients of a step and the conversions between eps, v, sample and x0."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from accel_diffusion.engine.step import StepContext

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def context(scheduler, timestep, x_t: torch.Tensor, prediction_type: str = "epsilon", index: int = 0) -> StepContext:
    return StepContext(index, 10, torch.as_tensor(timestep), x_t, x_t, scheduler, prediction_type)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_conversions_are_consistent_in_every_parameterisation(prediction_type: str) -> None:
    g = torch.Generator().manual_seed(0)
    x_t, output = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=g,
                                                                                         dtype=torch.float64)
    step = context(DDIMScheduler(**SD, prediction_type=prediction_type), 601, x_t, prediction_type)
    assert abs(step.alpha**2 + step.sigma**2 - 1) < 1e-12
    x0, eps = step.predicted_x0(output), step.predicted_eps(output)
    assert torch.allclose(step.alpha * x0 + step.sigma * eps, x_t, atol=1e-12)  # x_t = alpha x0 + sigma eps
    assert torch.allclose(step.output_from_x0(x0), output, atol=1e-12)
    assert torch.allclose(step.output_from_eps(eps), output, atol=1e-12)


def test_float16_v_to_noise_does_not_cancel_where_sigma_is_small() -> None:
    """Near t = 0 (sigma 0.029) going through x0, eps = (x_t - alpha x0) / sigma cancels in float16
    (0.1 off); eps = sigma x_t + alpha v, computed in float32, is exact to float16 rounding."""
    scheduler = DDIMScheduler(**SD, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(1)
    x_t, v = torch.randn(1, 4, 16, 16, generator=g).half(), torch.randn(1, 4, 16, 16, generator=g).half()
    step = context(scheduler, 0, x_t, "v_prediction")
    assert step.sigma < 0.03
    reference = step.sigma * x_t.double() + step.alpha * v.double()
    ours = step.predicted_eps(v)
    through_x0 = (x_t - step.alpha * (step.alpha * x_t - step.sigma * v)) / step.sigma
    assert ours.dtype == torch.float16
    assert (ours.double() - reference).abs().max() < 2e-3
    assert (through_x0.double() - reference).abs().max() > 0.05  # what the float16 route through x0 gives


def test_coefficients_follow_the_sigmas_a_diffusers_scheduler_steps_with() -> None:
    """Karras sigmas sit at fractional timesteps: alpha, sigma come from the scheduler's own sigma."""
    x = torch.zeros(1, 4, 8, 8)
    for scheduler in (EulerDiscreteScheduler(**SD, use_karras_sigmas=True),
                      DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True)):
        scheduler.set_timesteps(8)
        for i, t in enumerate(scheduler.timesteps):
            model_input = scheduler.scale_model_input(x, t)  # Euler's sets its step index here, DPM's in step()
            step, late = context(scheduler, t, model_input, index=i), context(scheduler, t, model_input, index=i)
            sigma = float(scheduler.sigmas[i])
            assert step.alpha == pytest.approx(1 / (1 + sigma**2) ** 0.5, rel=1e-9), (type(scheduler).__name__, i)
            x = scheduler.step(torch.zeros_like(x), t, x).prev_sample
            assert step.sigma == pytest.approx(sigma / (1 + sigma**2) ** 0.5, rel=1e-9)
            # first read after the scheduler stepped (as a preview's is): still this step's sigma
            assert late.sigma == pytest.approx(step.sigma, rel=1e-12), (type(scheduler).__name__, i)
