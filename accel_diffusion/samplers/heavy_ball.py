"""Heavy-ball momentum as a sampler component: ``{"name": "hb", "beta": 0.8, "base": "dpmpp_2m"}``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from diffusers import SchedulerMixin
from pydantic import Field

from accel_diffusion.registry import register_component
from accel_diffusion.samplers.base import Sampler, build_scheduler
from accel_diffusion.schedulers.heavy_ball import HeavyBallScheduler


@register_component("sampler", "hb")
class HeavyBallSampler(Sampler):
    """HB momentum (``beta`` < 1; 1 = the base solver) on DPM-Solver++ 2M or on PLMS-``plms_order``.

    Mitigates the saturated "divergence artifacts" of multistep solvers at few steps and high
    guidance; first-order convergent for beta < 1.
    """

    def __init__(
        self,
        beta: Annotated[float, Field(gt=0.0, le=1.0)] = 0.8,
        base: Literal["dpmpp_2m", "plms"] = "dpmpp_2m",
        plms_order: Literal[1, 2, 3, 4] = 4,
        lower_order_final: bool = True,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
    ) -> None:
        self.beta = beta
        self.base = base
        self.plms_order = plms_order
        self.lower_order_final = lower_order_final
        self.final_sigmas_type = final_sigmas_type

    def make_scheduler(
        self, model_scheduler_config: dict[str, Any], schedule_options: dict[str, Any]
    ) -> SchedulerMixin:
        return build_scheduler(
            HeavyBallScheduler,
            model_scheduler_config,
            schedule_options,
            beta=self.beta,
            base=self.base,
            plms_order=self.plms_order,
            lower_order_final=self.lower_order_final,
            final_sigmas_type=self.final_sigmas_type,
        )
