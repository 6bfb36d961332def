"""The ``student`` strategy component ``one_step``: what a distilled student can run with, checked at the edge.

A student model's registry entry names it in its ``default_strategy`` (``student = { name = "one_step" }``)
with the step counts it was trained for. A request that asks such a model for something it cannot do gets a
400 naming the field: CFG branches (it was distilled without an unconditional branch), a multistep sampler
(its one step is a direct x0 jump), or a step count it was not trained for. Nothing falls back silently.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from accel_diffusion.errors import IncompatibleStrategyError, InvalidRequestError
from accel_diffusion.registry import register_component

SINGLE_STEP_SAMPLERS = ("ddim", "lcm")
"""Samplers whose update from one model output lands on its x0 estimate (no history of past outputs)."""


@register_component("student", "one_step")
class OneStepStudent:
    """A distilled 1-step (or few-step) generator: fixed steps, no guidance branches, a single-step sampler."""

    def __init__(self, steps: Annotated[list[int], Field(min_length=1)] = [1],  # noqa: B006 (a JSON default)
                 samplers: Annotated[list[str], Field(min_length=1)] = ["ddim", "lcm"]) -> None:  # noqa: B006
        bad_steps = [s for s in steps if not 1 <= s <= 8]
        if bad_steps:
            raise InvalidRequestError("strategy.student.steps", f"step counts must lie in 1..8, got {bad_steps}")
        unknown = [s for s in samplers if s not in SINGLE_STEP_SAMPLERS]
        if unknown:
            raise InvalidRequestError("strategy.student.samplers", f"{unknown} are not single-step samplers",
                                      list(SINGLE_STEP_SAMPLERS))
        self.steps = list(steps)
        self.samplers = list(samplers)

    def check(self, strategy: Any, steps: int, steps_given: bool) -> None:
        """Refuse a resolved strategy and step count this student cannot run (errors name the field)."""
        sampler = strategy.sampler["name"]
        if sampler not in self.samplers:
            raise IncompatibleStrategyError(
                "strategy.sampler", f"{sampler!r} cannot run a one-step student (it was distilled for a direct "
                f"x0 jump); send one of {self.samplers} or leave the sampler out")
        guidance = strategy.guidance
        if guidance["name"] != "none":
            raise IncompatibleStrategyError(
                "strategy.guidance", f"{guidance['name']!r} needs guidance branches the student was distilled "
                "without (1 NFE per step); send {\"name\": \"none\"} or leave the guidance out")
        trained = sorted(set(self.steps))
        if steps not in trained:
            source = "" if steps_given else " (the model's default)"
            raise InvalidRequestError(
                "steps", f"is {steps}{source}; this student was trained for {trained} step(s): "
                f"send steps={trained[0]}" + (f" (or one of {trained})" if len(trained) > 1 else ""))

    def check_stream(self, guidance: str, mode: str, slots: int) -> None:
        """Refuse a stream session this student cannot run: guidance branches, img2img (the student was
        distilled from pure noise at t = 999) or a number of steps (``t_index_list`` entries) it was not
        trained for. Errors name the session's field."""
        if guidance != "none":
            raise IncompatibleStrategyError(
                "guidance", f"{guidance!r} needs guidance branches the student was distilled without; send \"none\"")
        if mode != "txt2img":
            raise IncompatibleStrategyError(
                "mode", "a one-step student starts from pure noise: send mode \"txt2img\" with t_index_list [0]")
        if slots not in self.steps:
            raise InvalidRequestError(
                "t_index_list", f"has {slots} step(s); this student was trained for {sorted(set(self.steps))} "
                "step(s): send [0] for one step")
