"""No guidance: one conditional model call per step."""

from __future__ import annotations

import torch

from accel_diffusion.engine.step import StepContext
from accel_diffusion.guidance.base import COND, Guidance
from accel_diffusion.registry import register_component


@register_component("guidance", "none")
class NoGuidance(Guidance):
    """The conditional prediction alone (1 model evaluation per step)."""

    def __init__(self) -> None:
        pass

    def branches(self, step: StepContext) -> tuple[str, ...]:
        return (COND,)

    def combine(self, predictions: dict[str, torch.Tensor], step: StepContext) -> torch.Tensor:
        return predictions[COND]
