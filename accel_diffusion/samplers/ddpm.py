"""DDPM ancestral sampling (Ho et al. 2020): the default sampler of MAR's per-token diffusion head."""

from __future__ import annotations

from typing import Any, Literal

from diffusers import DDPMScheduler, SchedulerMixin

from accel_diffusion.registry import register_component
from accel_diffusion.samplers.base import Sampler, build_scheduler


@register_component("sampler", "ddpm")
class DdpmSampler(Sampler):
    """DDPM ancestral steps (fresh noise every step), diffusers' DDPMScheduler on the respaced chain.

    MAR's diffusion head samples this way; on that head DDIM needs about 5x more steps for the same
    quality (specs/samplers.md §5.2). ``variance``: "fixed_small" (the posterior variance, beta-tilde)
    or "fixed_large" (beta). x0 is never clipped (diffusers' default clips it to [-1, 1]).
    """

    def __init__(self, variance: Literal["fixed_small", "fixed_large"] = "fixed_small") -> None:
        self.variance = variance

    def make_scheduler(
        self, model_scheduler_config: dict[str, Any], schedule_options: dict[str, Any]
    ) -> SchedulerMixin:
        return build_scheduler(
            DDPMScheduler, model_scheduler_config, schedule_options, clip_sample=False, variance_type=self.variance
        )
