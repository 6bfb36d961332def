"""Guidance components: which model branches each step evaluates, and how they are combined.

The engine asks ``branches(step)`` before every model call and sends exactly those branches to the
model, stacked along the batch, in that order; NFE is therefore exact per method. A guidance object
is built per generation, so any state it keeps (momentum, previous predictions) never leaks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from accel_diffusion.engine.step import StepContext

COND = "cond"
UNCOND = "uncond"


class Guidance(ABC):
    """Base class of guidance components."""

    #: whether the engine must encode the negative prompt (unconditional branch) at all
    needs_uncond: bool = False

    def check_mode(self, img2img: bool) -> None:
        """Raise IncompatibleStrategyError if this guidance cannot run in this mode (checked when a
        request is accepted, before any work, and again by ``begin``)."""
        return None

    def begin(self, init_latents: torch.Tensor | None) -> None:
        """Called once per generation before the first step; ``init_latents`` are the clean (scaled)
        latents of the init image in img2img, else None. Resets any per-generation state."""
        return None

    @abstractmethod
    def branches(self, step: StepContext) -> tuple[str, ...]:
        """The branches to evaluate at this step, in batch order (e.g. ``("uncond", "cond")``)."""

    @abstractmethod
    def combine(self, predictions: dict[str, torch.Tensor], step: StepContext) -> torch.Tensor:
        """The model output the sampler steps with, from the evaluated branches' outputs."""
