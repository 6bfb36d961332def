"""Helpers for scheduler tests: diffusers' own dummy model and sample, and step-by-step loops."""

from __future__ import annotations

from collections.abc import Callable

import torch

from accel_diffusion.models.gmm.denoiser import GmmDenoiser
from accel_diffusion.models.gmm.mixture import default_mixture

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
               "beta_end": 0.012}
DUMMY_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}


def dummy_sample() -> torch.Tensor:
    """diffusers' ``dummy_sample_deter`` (tests/schedulers/test_schedulers.py)."""
    n = 4 * 3 * 8 * 8
    return (torch.arange(n).flip(-1).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)


def dummy_model(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """diffusers' scheduler-test model: x * t / (t + 1)."""
    t = torch.as_tensor(t).reshape(-1, *(1,) * (sample.ndim - 1)).to(sample.dtype)
    return sample * t / (t + 1)


def trajectory(scheduler, model: Model, sample: torch.Tensor, steps: int | None = None,
               **set_timesteps: object) -> list[torch.Tensor]:
    """All states x_0 (input) .. x_N of one run; ``set_timesteps`` kwargs override ``steps``."""
    if set_timesteps:
        scheduler.set_timesteps(**set_timesteps)
    else:
        scheduler.set_timesteps(steps)
    states = [sample]
    for t in scheduler.timesteps:
        states.append(scheduler.step(model(states[-1], t), t, states[-1], return_dict=False)[0])
    return states


def max_step_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def gmm_denoiser(prediction_type: str = "epsilon") -> GmmDenoiser:
    return GmmDenoiser.from_mixture(default_mixture(), prediction_type=prediction_type, **SD_SCHEDULE)


def gmm_model(denoiser: GmmDenoiser) -> Model:
    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return denoiser(x, t).sample

    return model


def gmm_noise(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
