"""Karras et al. (2022) sigma spacing on schedulers that support it."""

from __future__ import annotations

from typing import Annotated, Any

from diffusers import SchedulerMixin
from pydantic import Field

from accel_diffusion.registry import register_component
from accel_diffusion.schedules.base import Schedule, incompatible, scheduler_accepts

KARRAS_SAMPLERS = ["deis", "diffusers_deis", "dpmpp_2m", "euler", "ghvb", "hb", "unipc"]
ANY_RHO_SAMPLERS = ["deis", "ghvb", "hb"]
DIFFUSERS_KARRAS_RHO = 7.0


@register_component("schedule", "karras")
class KarrasSchedule(Schedule):
    """Karras sigmas: s_i = (s_max^(1/rho) + u_i (s_min^(1/rho) - s_max^(1/rho)))^rho, denser near the data.

    diffusers' samplers take only rho = 7, call the model on u_i = i/(N-1) (N levels) and end with a
    repeated last sigma or 0; accel-diffusion's samplers take any rho and call the model at the
    first N of N + 1 levels u_i = i/N, then end at 0 or sigma_min.
    """

    def __init__(self, rho: Annotated[float, Field(gt=0.0, le=20.0)] = DIFFUSERS_KARRAS_RHO) -> None:
        self.rho = rho

    def scheduler_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"use_karras_sigmas": True}
        if self.rho != DIFFUSERS_KARRAS_RHO:
            options["karras_rho"] = self.rho
        return options

    def check_compatible(self, scheduler: SchedulerMixin, sampler_name: str) -> None:
        if not scheduler_accepts(scheduler, "__init__", "use_karras_sigmas"):
            incompatible("karras", sampler_name, "the sampler has no sigma schedule", KARRAS_SAMPLERS)
        if self.rho != DIFFUSERS_KARRAS_RHO and not scheduler_accepts(scheduler, "__init__", "karras_rho"):
            incompatible("karras", sampler_name, f"rho={self.rho:g} needs a sampler with any Karras rho",
                         ANY_RHO_SAMPLERS)
