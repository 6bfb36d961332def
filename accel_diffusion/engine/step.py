"""What a component sees of the current denoising step."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from diffusers import SchedulerMixin


@dataclass
class StepContext:
    """One step of the denoising loop: index, timestep, the scheduler's latents and the model input.

    ``model_input`` is the VP-scaled x_t the model sees (``scheduler.scale_model_input(latents)``);
    ``alpha`` and ``sigma`` are the VP coefficients at ``timestep`` (x_t = alpha x0 + sigma eps),
    computed on first use (from the scheduler's ``alpha_sigma_at`` if it has one, else by interpolating
    its ``alphas_cumprod``).
    """

    index: int
    num_steps: int
    timestep: torch.Tensor
    latents: torch.Tensor
    model_input: torch.Tensor
    scheduler: SchedulerMixin
    prediction_type: str

    @property
    def progress(self) -> float:
        """Fraction of the trajectory already done before this step, in [0, 1)."""
        return self.index / self.num_steps

    @cached_property
    def _alpha_sigma(self) -> tuple[float, float]:
        exact = getattr(self.scheduler, "alpha_sigma_at", None)
        if exact is not None:  # accel-diffusion's solvers know their (fractional-timestep) noise levels
            return exact(self.timestep)
        alphas_cumprod = self.scheduler.alphas_cumprod
        t = float(self.timestep)
        low = int(t)
        high = min(low + 1, len(alphas_cumprod) - 1)
        frac = t - low
        a2 = float(alphas_cumprod[low]) * (1 - frac) + float(alphas_cumprod[high]) * frac
        return a2**0.5, (1.0 - a2) ** 0.5

    @property
    def alpha(self) -> float:
        return self._alpha_sigma[0]

    @property
    def sigma(self) -> float:
        return self._alpha_sigma[1]

    def predicted_x0(self, model_output: torch.Tensor) -> torch.Tensor:
        """The denoised estimate x0 implied by ``model_output`` at this step (eps, v or sample prediction)."""
        x_t = self.model_input[: model_output.shape[0]]
        if self.prediction_type == "epsilon":
            return (x_t - self.sigma * model_output) / self.alpha
        if self.prediction_type == "v_prediction":
            return self.alpha * x_t - self.sigma * model_output
        if self.prediction_type == "sample":
            return model_output
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

    def predicted_eps(self, model_output: torch.Tensor) -> torch.Tensor:
        """The noise estimate implied by ``model_output`` (eps = (x_t - alpha x0) / sigma)."""
        if self.prediction_type == "epsilon":
            return model_output
        x_t = self.model_input[: model_output.shape[0]]
        return (x_t - self.alpha * self.predicted_x0(model_output)) / self.sigma

    def output_from_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """The model output (in this model's parameterisation) whose x0 estimate is ``x0``."""
        x_t = self.model_input[: x0.shape[0]]
        if self.prediction_type == "sample":
            return x0
        eps = (x_t - self.alpha * x0) / self.sigma
        if self.prediction_type == "epsilon":
            return eps
        return self.alpha * eps - self.sigma * x0  # v = alpha eps - sigma x0

    def output_from_eps(self, eps: torch.Tensor) -> torch.Tensor:
        """The model output (in this model's parameterisation) whose noise estimate is ``eps``."""
        if self.prediction_type == "epsilon":
            return eps
        x_t = self.model_input[: eps.shape[0]]
        return self.output_from_x0((x_t - self.sigma * eps) / self.alpha)
