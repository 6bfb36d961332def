"""The denoising loop. It exists once; every method plugs into it as a component."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import SchedulerMixin

from accel_diffusion.engine import batch_invariance
from accel_diffusion.engine.conditioning import Conditioning
from accel_diffusion.engine.hooks import NO_HOOKS, GenerationHooks, LoopCounters, StepEvent
from accel_diffusion.engine.step import StepContext
from accel_diffusion.guidance.base import Guidance


def call_model(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Call a diffusers model (UNet, or any ModelMixin taking (sample, timestep)) and return its tensor."""
    out = model(x, t, **kwargs, return_dict=False)
    return out[0] if isinstance(out, tuple | list) else out


def _call_branches(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, kwargs: dict[str, Any],
                   branches: int) -> torch.Tensor:
    """The model over branch-major rows [branch 0 of every image, branch 1 of every image, ...].

    Under ``BatchInvariantOps`` the rows are reordered image-major for the call, so that an image's
    branches are one unit of the mode: a lone image then runs unsplit, and in a batch runs the very
    call it would run alone.
    """
    invariant = batch_invariance.active()
    if invariant is None or branches == 1:
        return call_model(model, x, t, **kwargs)
    rows = x.shape[0]
    with invariant.grouped(branches):
        if rows == branches:  # a lone image: one unit, already in order
            return call_model(model, x, t, **kwargs)
        output = call_model(model, _image_major(x, branches, rows), t, **_image_major(kwargs, branches, rows))
    return _branch_major(output, branches)


def _image_major(value: Any, branches: int, rows: int) -> Any:
    """Branch-major rows -> image-major, for every tensor with ``rows`` rows (nested dicts too)."""
    if isinstance(value, dict):
        return {k: _image_major(v, branches, rows) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows:
        return value.unflatten(0, (branches, -1)).transpose(0, 1).flatten(0, 1)
    return value


def _branch_major(value: torch.Tensor, branches: int) -> torch.Tensor:
    return value.unflatten(0, (-1, branches)).transpose(0, 1).flatten(0, 1)


@torch.no_grad()
def denoise(
    model: torch.nn.Module,
    latents: torch.Tensor,
    scheduler: SchedulerMixin,
    timesteps: Sequence[torch.Tensor] | torch.Tensor,
    guidance: Guidance,
    conditioning: Conditioning,
    *,
    step_kwargs: dict[str, Any] | None = None,
    hooks: GenerationHooks = NO_HOOKS,
    counters: LoopCounters | None = None,
    after_step: Callable[[StepContext, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run ``scheduler`` over ``timesteps`` from ``latents``; returns the final latents.

    Every step: the guidance picks the branches, the model sees exactly those (stacked along the
    batch), the guidance combines them, the scheduler steps. ``counters`` accumulates NFE per image
    (each branch counts) and forward passes; ``hooks`` gets progress and may cancel;
    ``after_step(step, guided_model_output, new_latents)`` runs after every step (previews).
    """
    counters = counters if counters is not None else LoopCounters()
    step_kwargs = step_kwargs or {}
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    total = len(timesteps)
    start = time.perf_counter()
    for index, t in enumerate(timesteps):
        hooks.check_cancel(index, total)
        scaled = scheduler.scale_model_input(latents, t)
        step = StepContext(index, total, t, latents, scaled, scheduler, prediction_type)
        branches = guidance.branches(step)
        model_input = scaled if len(branches) == 1 else torch.cat([scaled] * len(branches))
        output = _call_branches(model, model_input, t, conditioning.model_kwargs(branches), len(branches))
        counters.forward_passes += 1
        counters.nfe += len(branches)
        predictions = dict(zip(branches, output.chunk(len(branches)))) if len(branches) > 1 else {
            branches[0]: output
        }
        guided = guidance.combine(predictions, step)
        latents = scheduler.step(guided, t, latents, **step_kwargs, return_dict=False)[0]
        if hooks.on_step is not None:
            hooks.on_step(StepEvent(index + 1, total, float(t), time.perf_counter() - start))
        if after_step is not None:
            after_step(step, guided, latents)
    return latents
