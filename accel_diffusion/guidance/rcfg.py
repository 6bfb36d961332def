"""Residual classifier-free guidance (RCFG, StreamDiffusion; Kodaira et al. 2023).

CFG's unconditional prediction is replaced by a "virtual residual noise" that explains the current
latent x_t as a noised version of a reference clean latent X:

    eps_bar = (x_t - alpha_t X) / sigma_t
    eps     = delta * eps_bar + scale * (eps_cond - delta * eps_bar)

- ``variant="self"`` (self-negative): X is the init image's latent, so guidance pushes away from the
  input; no negative-prompt evaluation at all: 1 model evaluation per step. img2img only.
- ``variant="onetime"`` (onetime-negative): the first step also evaluates the negative prompt; X is
  that prediction's x0 estimate, used for every later step: 1 evaluation per step + 1.
- At ``scale`` 1 the rule gives eps_cond whatever eps_bar is: no negative evaluation (1 per step).

The rule is applied to noise estimates; v-prediction outputs are converted there and back.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from accel_diffusion.engine.step import StepContext
from accel_diffusion.errors import IncompatibleStrategyError
from accel_diffusion.guidance.base import COND, UNCOND, Guidance
from accel_diffusion.registry import register_component


@register_component("guidance", "rcfg")
class RcfgGuidance(Guidance):
    """RCFG: CFG against a residual noise instead of a negative-prompt prediction (1 evaluation per step;
    onetime: + 1 at the first step). Self-negative needs an init image (img2img)."""

    def __init__(
        self,
        scale: Annotated[float, Field(ge=0.0, le=100.0)] = 1.2,
        delta: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0,
        variant: Literal["self", "onetime"] = "self",
    ) -> None:
        self.scale = scale
        self.delta = delta
        self.variant = variant
        # at scale 1 the rule is the conditional prediction alone: no negative evaluation (as StreamDiffusion)
        self.needs_uncond = variant == "onetime" and scale != 1.0
        self._reference: torch.Tensor | None = None  # X, the clean latent the residual noise refers to

    def check_mode(self, img2img: bool) -> None:
        if self.variant == "self" and not img2img:
            raise IncompatibleStrategyError(
                "strategy.guidance.variant", "RCFG 'self' needs an init image (img2img); use 'onetime' for "
                "text-to-image", ["onetime"])

    def begin(self, init_latents: torch.Tensor | None) -> None:
        self.check_mode(init_latents is not None)
        self._reference = init_latents if self.variant == "self" else None

    def branches(self, step: StepContext) -> tuple[str, ...]:
        if self.needs_uncond and self._reference is None:
            return (UNCOND, COND)
        return (COND,)

    def combine(self, predictions: dict[str, torch.Tensor], step: StepContext) -> torch.Tensor:
        if self.scale == 1.0:
            return predictions[COND]
        eps_cond = step.predicted_eps(predictions[COND])
        if UNCOND in predictions:  # onetime, first step: the residual noise is the negative prediction itself
            eps_bar = step.predicted_eps(predictions[UNCOND])
            self._reference = step.predicted_x0(predictions[UNCOND])
        else:
            assert self._reference is not None, "begin() sets the reference before the first step"
            x_t = step.model_input[: eps_cond.shape[0]]
            eps_bar = (x_t - step.alpha * self._reference) / step.sigma
        residual = self.delta * eps_bar
        return step.output_from_eps(residual + self.scale * (eps_cond - residual))
