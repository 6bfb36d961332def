"""DEIS as a sampler component: ``{"name": "deis", "variant": "tab", "order": 3}``."""

from __future__ import annotations

from typing import Any, Literal

from diffusers import SchedulerMixin

from accel_diffusion.registry import register_component
from accel_diffusion.samplers.base import Sampler, build_scheduler
from accel_diffusion.schedulers.deis import DeisScheduler


@register_component("sampler", "deis")
class DeisSampler(Sampler):
    """DEIS exponential-integrator multistep sampler (accel-diffusion's ``DeisScheduler``).

    ``variant``: "tab" (polynomial in t, the paper's main method), "rhoab" (in rho), "logrho"
    (in log rho; same trajectories as diffusers' DEIS) or "ipndm" (fixed equal-step weights).
    ``order``: number of eps values used (1 = DDIM; the reference's ab_order r is order r + 1).
    ``final_sigmas_type``: end at rho = 0 ("zero") or at the smallest training noise ("sigma_min").
    """

    def __init__(
        self,
        variant: Literal["tab", "rhoab", "logrho", "ipndm"] = "tab",
        order: Literal[1, 2, 3, 4] = 3,
        lower_order_final: bool = True,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
    ) -> None:
        self.variant = variant
        self.order = order
        self.lower_order_final = lower_order_final
        self.final_sigmas_type = final_sigmas_type

    def make_scheduler(
        self, model_scheduler_config: dict[str, Any], schedule_options: dict[str, Any]
    ) -> SchedulerMixin:
        return build_scheduler(
            DeisScheduler,
            model_scheduler_config,
            schedule_options,
            variant=self.variant,
            order=self.order,
            lower_order_final=self.lower_order_final,
            final_sigmas_type=self.final_sigmas_type,
        )
