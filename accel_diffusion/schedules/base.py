"""Schedule components: which timesteps (and, later, which UNet blocks) a generation visits."""

from __future__ import annotations

import contextlib
import inspect
from typing import TYPE_CHECKING, Any

import torch
from diffusers import SchedulerMixin

from accel_diffusion.errors import IncompatibleStrategyError

if TYPE_CHECKING:
    from accel_diffusion.models.registry import ModelSpec
    from accel_diffusion.strategy import Strategy


class Schedule:
    """Chooses the timesteps. The default implementation defers to the scheduler's own spacing."""

    def scheduler_options(self) -> dict[str, Any]:
        """Config overrides applied when the sampler builds its scheduler."""
        return {}

    def num_steps(self, requested_steps: int) -> int:
        """How many steps this schedule will run for a request asking for ``requested_steps``."""
        return requested_steps

    def set_timesteps(self, scheduler: SchedulerMixin, num_steps: int, device: torch.device) -> None:
        scheduler.set_timesteps(num_steps, device=device)

    def check_compatible(self, scheduler: SchedulerMixin, sampler_name: str) -> None:
        """Raise IncompatibleStrategyError if ``scheduler`` cannot follow this schedule."""

    def model_context(self, unet: torch.nn.Module) -> contextlib.AbstractContextManager[Any]:
        """What the UNet runs under during the loop (a searched schedule's block skipping); nothing by default."""
        return contextlib.nullcontext()

    def check_model(self, spec: ModelSpec) -> None:
        """Raise InvalidRequestError if this schedule cannot run on ``spec``'s network (a searched schedule's
        skipped blocks that its UNet lacks); read from the model's config, before anything is loaded."""

    def check_request(self, model_id: str, strategy: Strategy, steps: int | None) -> None:
        """Raise InvalidRequestError if this schedule was not made for this model, resolved strategy or
        requested step count (None: the request left steps to the model or the schedule)."""


def scheduler_accepts(scheduler: SchedulerMixin, method: str, argument: str) -> bool:
    if method == "__init__":
        return argument in inspect.signature(type(scheduler).__init__).parameters
    return argument in inspect.signature(getattr(scheduler, method)).parameters


def incompatible(schedule_name: str, sampler_name: str, why: str, allowed: list[str] | None = None) -> None:
    raise IncompatibleStrategyError(
        "strategy.schedule.name", f"schedule {schedule_name!r} cannot be used with sampler {sampler_name!r}: {why}",
        allowed,
    )
