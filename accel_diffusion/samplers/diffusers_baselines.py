"""The diffusers schedulers as sampler components: the baselines every method is compared with.

Each keeps the model's noise process (betas, prediction type, steps offset, spacing) and sets the
solver options from its own arguments; options diffusers would otherwise default silently in a
way that hurts (DDIM's x0 clipping to [-1, 1]) are set explicitly.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)
from pydantic import Field

from accel_diffusion.registry import register_component
from accel_diffusion.samplers.base import Sampler, build_scheduler


@register_component("sampler", "ddim")
class DdimSampler(Sampler):
    """DDIM (first order; eta=0 is the deterministic probability-flow solver, eta=1 is DDPM-like)."""

    def __init__(self, eta: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0) -> None:
        self.eta = eta

    def make_scheduler(
        self, model_scheduler_config: dict[str, Any], schedule_options: dict[str, Any]
    ) -> SchedulerMixin:
        return build_scheduler(
            DDIMScheduler,
            model_scheduler_config,
            schedule_options,
            clip_sample=False,
            set_alpha_to_one=model_scheduler_config.get("set_alpha_to_one", False),
        )

    def step_kwargs(self) -> dict[str, Any]:
        return {"eta": self.eta}


@register_component("sampler", "euler")
class EulerSampler(Sampler):
    """Euler on the probability-flow ODE in sigma (k-diffusion's sample_euler); ancestral adds noise."""

    def __init__(self, ancestral: bool = False) -> None:
        self.ancestral = ancestral

    def make_scheduler(
        self, model_scheduler_config: dict[str, Any], schedule_options: dict[str, Any]
    ) -> SchedulerMixin:
        cls = EulerAncestralDiscreteScheduler if self.ancestral else EulerDiscreteScheduler
        return build_scheduler(cls, model_scheduler_config, schedule_options)


@register_component("sampler", "dpmpp_2m")
class DpmppMultistepSampler(Sampler):
    """DPM-Solver++ multistep (order 2 by default: "DPM++ 2M"), diffusers' DPMSolverMultistepScheduler."""

    def __init__(
        self,
        order: Literal[1, 2, 3] = 2,
        lower_order_final: bool = True,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
    ) -> None:
        self.order = order
        self.lower_order_final = lower_order_final
        self.final_sigmas_type = final_sigmas_type

    def make_scheduler(
        self, model_scheduler_config: dict[str, Any], schedule_options: dict[str, Any]
    ) -> SchedulerMixin:
        return build_scheduler(
            DPMSolverMultistepScheduler,
            model_scheduler_config,
            schedule_options,
            algorithm_type="dpmsolver++",
            solver_order=self.order,
            solver_type="midpoint",
            lower_order_final=self.lower_order_final,
            final_sigmas_type=self.final_sigmas_type,
            thresholding=False,
        )


@register_component("sampler", "unipc")
class UniPcSampler(Sampler):
    """UniPC multistep predictor-corrector (diffusers' UniPCMultistepScheduler)."""

    def __init__(self, order: Literal[1, 2, 3] = 2, solver_type: Literal["bh1", "bh2"] = "bh2") -> None:
        self.order = order
        self.solver_type = solver_type

    def make_scheduler(
        self, model_scheduler_config: dict[str, Any], schedule_options: dict[str, Any]
    ) -> SchedulerMixin:
        return build_scheduler(
            UniPCMultistepScheduler,
            model_scheduler_config,
            schedule_options,
            solver_order=self.order,
            solver_type=self.solver_type,
            predict_x0=True,
            thresholding=False,
        )


@register_component("sampler", "diffusers_deis")
class DiffusersDeisSampler(Sampler):
    """diffusers' DEISMultistepScheduler (log-rho DEIS; the anchor for our "deis"); order = eps values used."""

    def __init__(self, order: Literal[1, 2, 3] = 2) -> None:
        self.order = order

    def make_scheduler(
        self, model_scheduler_config: dict[str, Any], schedule_options: dict[str, Any]
    ) -> SchedulerMixin:
        return build_scheduler(
            DEISMultistepScheduler,
            model_scheduler_config,
            schedule_options,
            solver_order=self.order,
            thresholding=False,
        )


@register_component("sampler", "lcm")
class LcmSampler(Sampler):
    """Latent-consistency multistep sampling (for LCM-distilled models; a baseline for students)."""

    def __init__(self, original_inference_steps: Annotated[int, Field(ge=1, le=1000)] = 50) -> None:
        self.original_inference_steps = original_inference_steps

    def make_scheduler(
        self, model_scheduler_config: dict[str, Any], schedule_options: dict[str, Any]
    ) -> SchedulerMixin:
        return build_scheduler(
            LCMScheduler,
            model_scheduler_config,
            schedule_options,
            original_inference_steps=self.original_inference_steps,
            clip_sample=False,
            set_alpha_to_one=model_scheduler_config.get("set_alpha_to_one", False),
        )
