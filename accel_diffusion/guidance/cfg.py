"""Classifier-free guidance (Ho & Salimans, 2022), with guidance rescale (Lin et al., 2023) and a window."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from accel_diffusion.engine.step import StepContext
from accel_diffusion.errors import InvalidRequestError
from accel_diffusion.guidance.base import COND, UNCOND, Guidance
from accel_diffusion.registry import register_component


@register_component("guidance", "cfg")
class CfgGuidance(Guidance):
    """CFG: uncond + scale (cond - uncond); 2 model evaluations per guided step, 1 elsewhere.

    ``rescale`` > 0 rescales the guided prediction's per-sample std towards the conditional one
    (Lin et al. 2023, §3.4), in txt2img and img2img alike. Like diffusers (``rescale_noise_cfg``) it
    works on the model's own output (epsilon or v); the paper's model predicts v.
    ``start``/``stop`` limit guidance to the steps ``int(start N) <= i < int(stop N)`` of the N steps
    that run (diffusers' guiders' rule; in img2img N counts the steps left after ``strength``, so
    ``stop=0.5`` guides the first half of those): switching it off for the last steps is a cheap
    speed-up (1 evaluation instead of 2 there). Unlike diffusers, which switches
    guidance off for scale <= 1, a scale in [0, 1) is applied as written (0 = the unconditional
    prediction); scale 1 is the conditional prediction alone.
    """

    def __init__(
        self,
        scale: Annotated[float, Field(ge=0.0, le=100.0)] = 7.5,
        rescale: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0,
        start: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0,
        stop: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0,
    ) -> None:
        if start >= stop:
            raise InvalidRequestError("strategy.guidance.stop", f"must be greater than start ({start}), got {stop}")
        self.scale = scale
        self.rescale = rescale
        self.start = start
        self.stop = stop
        self.needs_uncond = scale != 1.0

    def guided(self, step: StepContext) -> bool:
        return self.needs_uncond and int(self.start * step.num_steps) <= step.index < int(self.stop * step.num_steps)

    def branches(self, step: StepContext) -> tuple[str, ...]:
        return (UNCOND, COND) if self.guided(step) else (COND,)

    def combine(self, predictions: dict[str, torch.Tensor], step: StepContext) -> torch.Tensor:
        cond = predictions[COND]
        if UNCOND not in predictions:
            return cond
        uncond = predictions[UNCOND]
        guided = uncond + self.scale * (cond - uncond)
        if self.rescale > 0:
            dims = list(range(1, cond.ndim))
            std_cond = cond.std(dim=dims, keepdim=True)
            std_guided = guided.std(dim=dims, keepdim=True)
            rescaled = guided * (std_cond / std_guided)
            guided = self.rescale * rescaled + (1.0 - self.rescale) * guided
        return guided
