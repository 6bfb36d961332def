"""DiSA diffusion step annealing (Zhao et al. 2025): fewer head steps for later AR iterations.

An autoregressive model whose every token is sampled by a small diffusion head (``accel_diffusion.ar``)
runs the head once per AR iteration k = 0 .. K-1. Later iterations are nearly determined by the
tokens already generated, so DiSA gives them fewer denoising steps. With U = K - 1 and
n = upper - lower + 1 (specs/samplers.md §5.1):

    linear     S(k) = lower + floor((U - k) / U * (n - 1))
    cosine     S(k) = lower + floor((cos(pi k / U) + 1) / 2 * (n - 1))
    two_stage  S(k) = upper if k < U / 2 else lower
    constant   S(k) = lower                       (the paper's ablation: the LOW count)

Rounding is explicit: linear is exact integer arithmetic; cosine floors after adding 1e-9, so a
value that is an integer in exact arithmetic never drops by one through float error. With one AR
iteration (K = 1, U = 0: the formulas divide by zero) the only iteration generates every token from
nothing and gets ``upper`` steps (``lower`` for ``constant``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Literal

from diffusers import SchedulerMixin
from pydantic import Field

from accel_diffusion.errors import IncompatibleStrategyError, InvalidRequestError
from accel_diffusion.registry import register_component
from accel_diffusion.schedules.base import Schedule

if TYPE_CHECKING:
    from accel_diffusion.strategy import Strategy

MAX_HEAD_STEPS = 1000
AnnealingKind = Literal["linear", "cosine", "two_stage", "constant"]


class StepAnnealer:
    """The head's step count per AR iteration: ``steps_for(k, K)``; a plain policy object."""

    def __init__(self, upper: int, lower: int, kind: AnnealingKind = "linear") -> None:
        if lower < 1 or upper < 1:
            field = "lower" if lower < 1 else "upper"
            raise InvalidRequestError(f"strategy.schedule.{field}", f"must be a positive step count, got "
                                      f"{lower if field == 'lower' else upper}", f"1 .. {MAX_HEAD_STEPS}")
        if lower > upper:
            raise InvalidRequestError(
                "strategy.schedule.lower", f"is {lower}, above upper ({upper}); DiSA anneals from upper down to "
                "lower: set lower <= upper (equal values give a constant head)", f"1 .. {upper}")
        self.upper = upper
        self.lower = lower
        self.kind = kind

    def steps_for(self, k: int, num_iterations: int) -> int:
        """Head steps at AR iteration ``k`` (0-based) of ``num_iterations``."""
        if num_iterations < 1 or not 0 <= k < num_iterations:
            raise ValueError(f"iteration {k} is outside 0 .. {num_iterations - 1}")
        if self.kind == "constant":
            return self.lower
        last = num_iterations - 1  # U
        if last == 0:
            return self.upper
        span = self.upper - self.lower  # n - 1
        if self.kind == "linear":
            return self.lower + (last - k) * span // last
        if self.kind == "cosine":
            return self.lower + math.floor((math.cos(math.pi * k / last) + 1.0) / 2.0 * span + 1e-9)
        return self.upper if 2 * k < last else self.lower  # two_stage: k < U/2

    def plan(self, num_iterations: int) -> list[int]:
        """Head steps of every AR iteration, in order."""
        return [self.steps_for(k, num_iterations) for k in range(num_iterations)]


@register_component("schedule", "disa")
class DisaSchedule(Schedule, StepAnnealer):
    """DiSA: anneal an AR model's diffusion-head steps from ``upper`` (first iteration) to ``lower`` (last).

    Only autoregressive models with a diffusion head (``shapes_mar``) take it; their head runs
    ``steps_for(k, K)`` steps at AR iteration k. ``kind``: linear (the paper's default), cosine,
    two_stage (upper for the first half of the iterations, then lower) or constant (``lower`` everywhere).
    """

    def __init__(
        self,
        upper: Annotated[int, Field(ge=1, le=MAX_HEAD_STEPS)] = 50,
        lower: Annotated[int, Field(ge=1, le=MAX_HEAD_STEPS)] = 5,
        kind: AnnealingKind = "linear",
    ) -> None:
        StepAnnealer.__init__(self, upper, lower, kind)

    def num_steps(self, requested_steps: int) -> int:
        return self.upper

    # The image-denoising engine asks these; an AR pipeline never does (it calls steps_for).
    def check_request(self, model_id: str, strategy: Strategy, steps: int | None) -> None:
        _not_an_ar_model(model_id)

    def check_compatible(self, scheduler: SchedulerMixin, sampler_name: str) -> None:
        _not_an_ar_model(None)


def _not_an_ar_model(model_id: str | None) -> None:
    model = f"model {model_id!r}" if model_id else "this model"
    raise IncompatibleStrategyError(
        "strategy.schedule.name", f"schedule 'disa' anneals the diffusion-head steps of an autoregressive model "
        f"(shapes_mar); {model} denoises whole images: use another schedule",
        ["spacing", "karras", "timesteps", "searched"])
