"""Karras et al. (2022) sigma spacing, rho = 7, on schedulers that support it."""

from __future__ import annotations

from typing import Any

from diffusers import SchedulerMixin

from accel_diffusion.registry import register_component
from accel_diffusion.schedules.base import Schedule, incompatible, scheduler_accepts

KARRAS_SAMPLERS = ["deis", "dpmpp_2m", "euler", "unipc"]


@register_component("schedule", "karras")
class KarrasSchedule(Schedule):
    """Karras sigmas: sigma_i = (s_max^(1/7) + i/(N-1) (s_min^(1/7) - s_max^(1/7)))^7 (denser near the data)."""

    def __init__(self) -> None:
        pass

    def scheduler_options(self) -> dict[str, Any]:
        return {"use_karras_sigmas": True}

    def check_compatible(self, scheduler: SchedulerMixin, sampler_name: str) -> None:
        if not scheduler_accepts(scheduler, "__init__", "use_karras_sigmas"):
            incompatible("karras", sampler_name, "the sampler has no sigma schedule", KARRAS_SAMPLERS)
