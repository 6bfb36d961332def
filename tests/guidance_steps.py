"""A StepContext on a real scheduler state, for testing guidance combiners in isolation."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from accel_diffusion.engine.step import StepContext


def step_context(prediction_type: str = "epsilon", timestep: int = 601, batch: int = 2, index: int = 0,
                 num_steps: int = 10, seed: int = 0) -> StepContext:
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, clip_sample=False)
    x_t = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    return StepContext(index, num_steps, torch.tensor(timestep), x_t, x_t, scheduler, prediction_type)


def predictions(batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, 4, 8, 8, generator=g)
    return {"cond": cond, "uncond": cond + 0.5 * torch.randn(batch, 4, 8, 8, generator=g)}
