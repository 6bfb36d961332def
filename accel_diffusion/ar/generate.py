"""A ``GenerationRequest`` on an autoregressive model (``family == "mar"``): the engine's entry for ``shapes_mar``.

The request's strategy is read the AR way: the sampler and guidance drive the diffusion head at every
AR iteration; the schedule decides the head's steps per iteration: ``disa`` anneals them (its
``steps_for(k, K)``), ``spacing`` (at "model") runs the request's ``steps`` (else the model's
default) at every iteration: the constant head. The number of AR iterations is the request's
``ar_iterations`` (1 .. the model's tokens), else the model's ``default_ar_iterations``. Progress
events come once per AR iteration; a cancel stops the generation between iterations. The result's
``extra["ar"]`` reports the head steps per iteration, their sum, tokens per iteration and the head's and
transformer's evaluations and seconds.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from accel_diffusion.errors import IncompatibleStrategyError, InvalidRequestError
from accel_diffusion.schedules.disa import DisaSchedule

if TYPE_CHECKING:
    from accel_diffusion.engine.engine import GenerationResult, PreparedStrategy
    from accel_diffusion.engine.hooks import GenerationHooks
    from accel_diffusion.models.loading import LoadedPipeline
    from accel_diffusion.models.registry import ModelSpec
    from accel_diffusion.strategy import GenerationRequest

AR_SCHEDULES = ["disa", "spacing"]


def is_ar_location(location: str) -> bool:
    """Whether a model directory holds an AR model (``mar_config.json``)."""
    return os.path.isfile(os.path.join(location, "mar_config.json"))  # (os.path: checked at every request)


def is_ar_spec(spec: ModelSpec) -> bool:
    return spec.source != "hub" and is_ar_location(spec.location())


def check_ar_request(spec: ModelSpec, request: GenerationRequest, prepared: PreparedStrategy) -> None:
    """Refuse, at the edge, what the AR model cannot do: a 400 naming the field."""
    schedule = prepared.strategy.schedule or {}
    if schedule.get("name") not in AR_SCHEDULES or (schedule["name"] == "spacing" and schedule["spacing"] != "model"):
        raise IncompatibleStrategyError(
            "strategy.schedule.name", f"model {spec.id!r} is autoregressive: its diffusion head takes schedule "
            "'disa' (annealed head steps) or 'spacing' (constant head steps, spacing 'model')", AR_SCHEDULES)
    if prepared.student is not None or prepared.runtime is not None:
        raise IncompatibleStrategyError("strategy", f"model {spec.id!r} is autoregressive: it takes no student or "
                                        "runtime component")
    if request.init_image is not None:
        raise InvalidRequestError("init_image", f"model {spec.id!r} is autoregressive and generates from nothing: "
                                  "img2img is not supported; leave init_image out")
    for name, value in (("width", request.width), ("height", request.height)):
        if value is not None and value != 32:
            raise InvalidRequestError(name, f"model {spec.id!r} generates 32x32 images, got {value}", "32")
    if request.steps is not None and isinstance(prepared.schedule, DisaSchedule):
        raise InvalidRequestError("steps", "schedule 'disa' decides the head's steps per AR iteration (its upper and "
                                  "lower): leave steps out, or use schedule 'spacing' for a constant head")
    if request.steps is not None and not 1 <= request.steps <= 1000:
        raise InvalidRequestError("steps", f"is {request.steps}; the diffusion head runs 1 .. 1000 steps")
    tokens = num_tokens(spec)
    if request.ar_iterations is not None and request.ar_iterations > tokens:
        raise InvalidRequestError("ar_iterations", f"is {request.ar_iterations}; model {spec.id!r} generates "
                                  f"{tokens} tokens, at least one per AR iteration: send 1 .. {tokens}")


def num_tokens(spec: ModelSpec) -> int:
    """The tokens per image of an AR model directory (its transformer's config)."""
    config = json.loads((Path(spec.location()) / "transformer" / "config.json").read_text())
    return int(config["num_tokens"])


def check_not_ar(spec: ModelSpec, request: GenerationRequest) -> None:
    """``ar_iterations`` on a model that is not autoregressive: a 400 naming it."""
    if request.ar_iterations is not None:
        raise InvalidRequestError("ar_iterations", f"model {spec.id!r} is not autoregressive: ar_iterations is for AR "
                                  "models (shapes_mar); leave it out")


def generate_ar(model: LoadedPipeline, request: GenerationRequest, hooks: GenerationHooks,
                seeds: Sequence[int] | None) -> GenerationResult:
    from accel_diffusion.engine.engine import GenerationResult, image_seeds, prepare_strategy
    from accel_diffusion.registry import get_registry

    t_start = time.perf_counter()
    prepared = prepare_strategy(model.spec, request.strategy, request.steps)
    check_ar_request(model.spec, request, prepared)
    pipe = model.pipeline
    iterations = request.ar_iterations or int(pipe.config["default_ar_iterations"])
    if isinstance(prepared.schedule, DisaSchedule):
        plan = prepared.schedule.plan(iterations)
    else:
        plan = [request.steps or model.spec.default_steps] * iterations
    prompts = [p for p in request.prompts for _ in range(request.n)]
    if seeds is None:
        seeds = image_seeds(request.seed, len(prompts))
    registry = get_registry()
    guidance_spec = prepared.strategy.guidance
    result = pipe.generate(prompts, list(seeds), plan, prepared.sampler,
                           lambda: registry.build("guidance", guidance_spec), hooks,
                           negative_prompt=request.negative_prompt)
    t_end = time.perf_counter()
    cost = result.cost
    return GenerationResult(
        images=result.images.astype(np.float32) / 255.0, prompts=prompts, seeds=list(seeds), model=model.model_id,
        strategy=prepared.strategy, steps=cost.head_steps_total, width=32, height=32,
        nfe=cost.head_nfe + cost.transformer_nfe, forward_passes=cost.head_nfe + cost.transformer_nfe,
        timings={"head": cost.head_seconds, "transformer": cost.transformer_seconds, "total": t_end - t_start},
        attention_backend=model.attention_backend, extra={"mode": "txt2img", "ar": cost.to_dict()},
    )
