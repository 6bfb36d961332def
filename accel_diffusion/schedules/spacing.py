"""The default schedule: N steps spaced by one of diffusers' timestep-spacing rules."""

from __future__ import annotations

from typing import Any, Literal

from accel_diffusion.registry import register_component
from accel_diffusion.schedules.base import Schedule


@register_component("schedule", "spacing")
class SpacingSchedule(Schedule):
    """N steps spaced by the model's rule, or by "leading", "trailing" or "linspace" (diffusers' spacings).

    "trailing" always includes the last training timestep (recommended for few steps; see
    "Common Diffusion Noise Schedules and Sample Steps are Flawed").
    """

    def __init__(self, spacing: Literal["model", "leading", "trailing", "linspace"] = "model") -> None:
        self.spacing = spacing

    def scheduler_options(self) -> dict[str, Any]:
        return {} if self.spacing == "model" else {"timestep_spacing": self.spacing}
