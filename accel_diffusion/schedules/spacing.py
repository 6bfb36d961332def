"""The default schedule: N steps spaced by one of diffusers' timestep rules, or by a noise-level rule."""

from __future__ import annotations

from typing import Any, Literal

from diffusers import SchedulerMixin

from accel_diffusion.registry import register_component
from accel_diffusion.schedules.base import Schedule, incompatible, scheduler_accepts

DIFFUSERS_SPACINGS = ("leading", "trailing", "linspace")
NOISE_LEVEL_SPACINGS = ("uniform_t", "quadratic_t", "log_snr")
NOISE_LEVEL_SAMPLERS = ["deis", "ghvb", "hb"]


@register_component("schedule", "spacing")
class SpacingSchedule(Schedule):
    """N steps spaced by the model's rule, a diffusers rule, or a rule on the noise level.

    - "model": the model's own ``timestep_spacing`` for diffusers' samplers; accel-diffusion's
      samplers use their own default grid (DEIS quadratic-t, HB and GHVB log-SNR);
    - "leading", "trailing", "linspace": diffusers' integer-timestep rules ("trailing" always
      includes the last training timestep, recommended for few steps);
    - "uniform_t", "quadratic_t" (uniform in sqrt(t): DEIS's default), "log_snr" (uniform in
      log rho): N + 1 noise levels from the largest to the smallest training noise, the model
      called at fractional timesteps. Only accel-diffusion's own samplers take these.
    """

    def __init__(
        self,
        spacing: Literal[
            "model", "leading", "trailing", "linspace", "uniform_t", "quadratic_t", "log_snr"
        ] = "model",
    ) -> None:
        self.spacing = spacing

    def scheduler_options(self) -> dict[str, Any]:
        if self.spacing == "model":
            return {}
        if self.spacing in NOISE_LEVEL_SPACINGS:
            return {"sigma_spacing": self.spacing}
        return {"timestep_spacing": self.spacing, "sigma_spacing": None}  # None: overrides a sampler's own grid

    def check_compatible(self, scheduler: SchedulerMixin, sampler_name: str) -> None:
        if self.spacing in NOISE_LEVEL_SPACINGS and not scheduler_accepts(scheduler, "__init__", "sigma_spacing"):
            incompatible("spacing", sampler_name, f"spacing {self.spacing!r} needs a noise-level grid",
                         NOISE_LEVEL_SAMPLERS)
