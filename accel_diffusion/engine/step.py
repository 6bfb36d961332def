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
        sigma_ve = self._scheduler_sigma()
        if sigma_ve is not None:  # the noise level the scheduler itself steps with (Karras etc. sigmas)
            return 1.0 / (1.0 + sigma_ve**2) ** 0.5, sigma_ve / (1.0 + sigma_ve**2) ** 0.5
        alphas_cumprod = self.scheduler.alphas_cumprod
        t = float(self.timestep)
        low = int(t)
        high = min(low + 1, len(alphas_cumprod) - 1)
        frac = t - low
        a2 = float(alphas_cumprod[low]) * (1 - frac) + float(alphas_cumprod[high]) * frac
        return a2**0.5, (1.0 - a2) ** 0.5

    def _scheduler_sigma(self) -> float | None:
        """sigmas[step] of a diffusers scheduler that steps on VE sigmas (Euler, DPM-Solver, ...): its
        fractional timesteps are log-sigma interpolations that interpolating alphas_cumprod in t misses."""
        scheduler = self.scheduler
        sigmas = getattr(scheduler, "sigmas", None)
        if not isinstance(sigmas, torch.Tensor) or not hasattr(scheduler, "alphas_cumprod"):
            return None
        if getattr(scheduler.config, "use_flow_sigmas", False):
            return None
        if not hasattr(scheduler, "index_for_timestep"):
            return None
        # from this step's timestep, not the scheduler's step_index: that has moved on once the
        # scheduler stepped (a preview converts after the step), and is None before DPM's first step
        index = scheduler.index_for_timestep(self.timestep)
        if not 0 <= int(index) < len(sigmas):
            return None
        return float(sigmas[int(index)])

    @property
    def alpha(self) -> float:
        return self._alpha_sigma[0]

    @property
    def sigma(self) -> float:
        return self._alpha_sigma[1]

    # The conversions run in float32 at least, in closed form (v -> eps is sigma x_t + alpha v, not
    # (x_t - alpha x0) / sigma, which cancels in float16 where sigma is small); results come back in the
    # input's dtype.

    def _x_t(self, like: torch.Tensor) -> torch.Tensor:
        return self.model_input[: like.shape[0]].to(_wide(like.dtype))

    def predicted_x0(self, model_output: torch.Tensor) -> torch.Tensor:
        """The denoised estimate x0 implied by ``model_output`` at this step (eps, v or sample prediction)."""
        if self.prediction_type == "sample":
            return model_output
        x_t, out = self._x_t(model_output), model_output.to(_wide(model_output.dtype))
        if self.prediction_type == "epsilon":
            return ((x_t - self.sigma * out) / self.alpha).to(model_output.dtype)
        if self.prediction_type == "v_prediction":
            return (self.alpha * x_t - self.sigma * out).to(model_output.dtype)
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

    def predicted_eps(self, model_output: torch.Tensor) -> torch.Tensor:
        """The noise estimate implied by ``model_output`` (eps = (x_t - alpha x0) / sigma)."""
        if self.prediction_type == "epsilon":
            return model_output
        x_t, out = self._x_t(model_output), model_output.to(_wide(model_output.dtype))
        if self.prediction_type == "v_prediction":  # eps = sigma x_t + alpha v
            return (self.sigma * x_t + self.alpha * out).to(model_output.dtype)
        if self.prediction_type == "sample":
            return ((x_t - self.alpha * out) / self.sigma).to(model_output.dtype)
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

    def output_from_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """The model output (in this model's parameterisation) whose x0 estimate is ``x0``."""
        if self.prediction_type == "sample":
            return x0
        x_t, wide = self._x_t(x0), x0.to(_wide(x0.dtype))
        eps = (x_t - self.alpha * wide) / self.sigma
        if self.prediction_type == "epsilon":
            return eps.to(x0.dtype)
        return (self.alpha * eps - self.sigma * wide).to(x0.dtype)  # v = alpha eps - sigma x0

    def output_from_eps(self, eps: torch.Tensor) -> torch.Tensor:
        """The model output (in this model's parameterisation) whose noise estimate is ``eps``."""
        if self.prediction_type == "epsilon":
            return eps
        x_t, wide = self._x_t(eps), eps.to(_wide(eps.dtype))
        if self.prediction_type == "v_prediction":  # v = (eps - sigma x_t) / alpha
            return ((wide - self.sigma * x_t) / self.alpha).to(eps.dtype)
        return ((x_t - self.sigma * wide) / self.alpha).to(eps.dtype)  # sample: x0


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
