"""``build_scheduler``: a fresh scheduler per call, equal to diffusers' ``from_config`` on the same settings, copied
from a prototype built once per class and configuration (no state shared between generations)."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from accel_diffusion.samplers import base
from accel_diffusion.samplers.base import build_scheduler, noise_process_config


def test_each_call_is_a_fresh_scheduler_equal_to_from_config() -> None:
    scheduler_config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                        "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1}
    options = {"timestep_spacing": "trailing", "use_karras_sigmas": True}  # DDIM does not take karras sigmas
    first = build_scheduler(DDIMScheduler, scheduler_config, options)
    second = build_scheduler(DDIMScheduler, scheduler_config, options)
    expected = DDIMScheduler.from_config(noise_process_config(scheduler_config) | {"timestep_spacing": "trailing"})
    assert first is not second and dict(first.config) == dict(expected.config)
    first.set_timesteps(4)
    assert first.timesteps.tolist() == [999, 749, 499, 249]
    assert second.num_inference_steps is None  # the other instance saw none of it
    torch.testing.assert_close(second.alphas_cumprod, expected.alphas_cumprod, rtol=0, atol=0)
    assert second.alphas_cumprod is not first.alphas_cumprod
    # solver settings are part of the key: a different order is a different scheduler
    second_order = build_scheduler(DPMSolverMultistepScheduler, scheduler_config, {}, solver_order=2)
    third_order = build_scheduler(DPMSolverMultistepScheduler, scheduler_config, {}, solver_order=3)
    assert (second_order.config.solver_order, third_order.config.solver_order) == (2, 3)


def test_the_prototype_cache_is_bounded() -> None:
    base._PROTOTYPES.clear()
    config = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}
    for i in range(base.MAX_PROTOTYPES + 3):
        build_scheduler(DDIMScheduler, config | {"beta_end": 0.01 + i * 1e-5}, {})
    assert 0 < len(base._PROTOTYPES) <= base.MAX_PROTOTYPES
