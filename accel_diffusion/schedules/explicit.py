"""An explicit, user-given list of timesteps (e.g. found by a search, or AYS-style lists)."""

from __future__ import annotations

from itertools import pairwise
from typing import Annotated

import torch
from diffusers import SchedulerMixin
from pydantic import AfterValidator, Field

from accel_diffusion.errors import InvalidRequestError
from accel_diffusion.registry import register_component
from accel_diffusion.schedules.base import Schedule, incompatible, scheduler_accepts

TIMESTEP_SAMPLERS = ["deis", "dpmpp_2m", "euler", "ghvb", "hb", "lcm"]


def _strictly_decreasing(timesteps: list[int]) -> list[int]:
    if any(a <= b for a, b in pairwise(timesteps)):
        raise ValueError("must be strictly decreasing")
    return timesteps


@register_component("schedule", "timesteps")
class ExplicitTimesteps(Schedule):
    """Exactly these discrete timesteps, strictly decreasing; the step count is their number."""

    def __init__(
        self,
        timesteps: Annotated[
            list[Annotated[int, Field(ge=0)]], Field(min_length=1), AfterValidator(_strictly_decreasing)
        ],
    ) -> None:
        self.timesteps = list(timesteps)

    def num_steps(self, requested_steps: int) -> int:
        return len(self.timesteps)

    def check_compatible(self, scheduler: SchedulerMixin, sampler_name: str) -> None:
        if not scheduler_accepts(scheduler, "set_timesteps", "timesteps"):
            incompatible("timesteps", sampler_name, "the sampler cannot take explicit timesteps", TIMESTEP_SAMPLERS)
        limit = scheduler.config.num_train_timesteps
        if self.timesteps[0] >= limit:
            raise InvalidRequestError(
                "strategy.schedule.timesteps", f"must be below the model's {limit} training timesteps",
                f"0 .. {limit - 1}",
            )

    def set_timesteps(self, scheduler: SchedulerMixin, num_steps: int, device: torch.device) -> None:
        scheduler.set_timesteps(device=device, timesteps=self.timesteps)
