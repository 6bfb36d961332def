"""``Engine.generate``: conditioning -> latents (txt2img / img2img) -> the loop -> decode -> result."""

from __future__ import annotations

import inspect
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from accel_diffusion.ar.generate import check_ar_request, check_not_ar, generate_ar, is_ar_spec
from accel_diffusion.engine.attention import batch_invariant_attention
from accel_diffusion.engine.batch_invariance import BatchInvariantOps
from accel_diffusion.engine.compiled import EngineAcceleration, check_acceleration, check_buckets
from accel_diffusion.engine.hooks import NO_HOOKS, GenerationHooks, LoopCounters
from accel_diffusion.engine.loop import denoise
from accel_diffusion.engine.step import StepContext
from accel_diffusion.errors import IncompatibleStrategyError, InvalidRequestError
from accel_diffusion.guidance.base import Guidance
from accel_diffusion.models.registry import ModelRegistry, ModelSpec
from accel_diffusion.registry import get_registry
from accel_diffusion.samplers.base import Sampler
from accel_diffusion.schedules.base import Schedule
from accel_diffusion.strategy import DEFAULT_LIMITS, MAX_SEED, GenerationRequest, RequestLimits, Strategy

if TYPE_CHECKING:
    from accel_diffusion.models.loading import LoadedPipeline


@dataclass
class GenerationResult:
    """Images as float32 (N, H, W, 3) in [0, 1], one per (prompt, i) in request order, and their cost."""

    images: np.ndarray
    prompts: list[str]
    seeds: list[int]
    model: str
    strategy: Strategy
    steps: int  # denoising steps run (img2img: the last strength x steps of the schedule)
    width: int
    height: int
    nfe: int  # model evaluations per image; cond and uncond counted separately
    forward_passes: int  # batched model calls
    timings: dict[str, float]
    attention_backend: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_uint8(self) -> np.ndarray:
        return (self.images * 255).round().astype(np.uint8)

    def to_pil(self) -> list[Image.Image]:
        return [Image.fromarray(a) for a in self.to_uint8()]

    def summary(self) -> dict[str, Any]:
        """JSON-safe description (everything except the pixels)."""
        return {
            "model": self.model,
            "prompts": self.prompts,
            "seeds": self.seeds,
            "strategy": self.strategy.model_dump(exclude_none=True),
            "steps": self.steps,
            "width": self.width,
            "height": self.height,
            "nfe": self.nfe,
            "forward_passes": self.forward_passes,
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
            "attention_backend": self.attention_backend,
            **self.extra,
        }


@dataclass
class PreparedStrategy:
    strategy: Strategy
    sampler: Sampler
    schedule: Schedule
    guidance: Guidance
    runtime: Any = None  # a runtime component (parallel/component.py), or None: the UNet as it is
    student: Any = None  # a ``student`` component (students/component.py) when the strategy names one


def prepare_strategy(spec: ModelSpec, requested: Strategy, steps: int | None = None, *,
                     ar: bool | None = None) -> PreparedStrategy:
    """Resolve ``requested`` over the model's default and build fresh components for one generation;
    the schedule refuses a model, strategy or requested ``steps`` it was not made for. ``ar``: whether
    ``spec`` is an AR model, when the caller has looked already (None: looked up here, a file check)."""
    strategy = requested.resolved_over(spec.default_strategy)
    registry = get_registry()
    runtime = None
    if strategy.runtime is not None:  # patch_parallel: the UNet call spread over torch.distributed ranks
        runtime = registry.build("runtime", strategy.runtime)
        runtime.check_available()
    prepared = PreparedStrategy(
        strategy=strategy,
        sampler=registry.build("sampler", strategy.sampler),
        schedule=registry.build("schedule", strategy.schedule),
        guidance=registry.build("guidance", strategy.guidance),
        runtime=runtime,
        student=registry.build("student", strategy.student) if strategy.student is not None else None,
    )
    if not (is_ar_spec(spec) if ar is None else ar):  # an AR model's head checks its own schedule (ar/generate.py)
        prepared.schedule.check_request(spec.id, strategy, steps)
        prepared.schedule.check_model(spec)
    return prepared


def check_student(prepared: PreparedStrategy, spec: ModelSpec, request: GenerationRequest) -> None:
    """A student refuses the guidance, sampler and step count it cannot run (a 400 naming the field)."""
    if prepared.student is not None:
        prepared.student.check(prepared.strategy, request.steps or spec.default_steps, request.steps is not None)


def check_request(spec: ModelSpec, request: GenerationRequest) -> PreparedStrategy:
    """Refuse, before any work (a server calls this when it accepts a job), a request whose strategy
    cannot run on this model spec: its components are built (every parameter validated) and the
    guidance checked against the mode (txt2img or img2img). Returns the prepared strategy, which
    ``check_limits`` takes: a server accepting a job prepares it once."""
    ar = is_ar_spec(spec)
    prepared = prepare_strategy(spec, request.strategy, request.steps, ar=ar)
    if ar:
        check_ar_request(spec, request, prepared)
        return prepared
    check_not_ar(spec, request)
    prepared.guidance.check_mode(request.init_image is not None)
    check_student(prepared, spec, request)
    return prepared


def check_limits(model: LoadedPipeline, request: GenerationRequest, limits: RequestLimits,
                 prepared: PreparedStrategy | None = None) -> None:
    """Refuse a request whose *resolved* values pass ``limits``: the steps and size the engine will use,
    the model's defaults filled in for what the request left out (and the steps an explicit
    ``timesteps`` schedule decides). The edge checked only what the request gave; a server calls this
    when it accepts a job (with ``prepared``, what ``check_request`` returned for it), the Engine before it
    generates."""
    if model.family not in ("sd", "sdxl"):
        return  # not a text-to-image pipeline: the engine refuses it
    steps = request.steps or model.spec.default_steps
    prepared = prepared or prepare_strategy(model.spec, request.strategy, request.steps)
    scheduled = prepared.schedule.num_steps(steps)
    if scheduled > limits.max_steps and scheduled != steps:  # an explicit timesteps list decides
        raise InvalidRequestError("strategy.schedule", f"runs {scheduled} steps; at most {limits.max_steps} allowed")
    if scheduled > limits.max_steps:
        source = "" if request.steps else " (the model's default, as the request gave none)"
        raise InvalidRequestError("steps", f"is {steps}{source}; at most {limits.max_steps} allowed: "
                                  f"send steps <= {limits.max_steps}")
    width, height = _request_size(model, request)
    origin = "the init image's" if request.init_image is not None else "the model's default"
    for name, value, given, limit in (("width", width, request.width, limits.max_width),
                                      ("height", height, request.height, limits.max_height)):
        if value > limit:
            source = "" if given is not None else f" ({origin}, as the request gave none)"
            raise InvalidRequestError(name, f"is {value}{source}; at most {limit} allowed: send {name} <= {limit}")
    if width * height > limits.max_pixels:
        source = "" if request.width and request.height else f" ({origin} size filled in what the request left out)"
        raise InvalidRequestError("width", f"{width}x{height} is {width * height} pixels{source}; at most "
                                  f"{limits.max_pixels} allowed: send a smaller width and height")


def image_seeds(seed: int | None, count: int) -> list[int]:
    base = random.SystemRandom().randrange(0, 2**31) if seed is None else seed
    if base + count - 1 > MAX_SEED:
        raise InvalidRequestError("seed", f"seed + images - 1 must stay below 2**63, got {base}")
    return [base + k for k in range(count)]


def _image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) in [-1, 1], resized with Lanczos when the size differs (as diffusers)."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0


def _request_size(model: LoadedPipeline, request: GenerationRequest) -> tuple[int, int]:
    width, height = request.width, request.height
    factor = model.vae_scale_factor
    if request.init_image is not None and (width is None or height is None):
        iw, ih = request.init_image.size
        width = width or iw - iw % factor
        height = height or ih - ih % factor
        if width < 8 or height < 8:
            raise InvalidRequestError("init_image", f"is {iw}x{ih}; it must be at least 8x8 pixels")
    default_w, default_h = model.default_size
    width, height = width or default_w, height or default_h
    if width % factor or height % factor:
        raise InvalidRequestError("width", f"this model needs multiples of {factor}, got {width}x{height}")
    return width, height


def _sdxl_time_ids(model: LoadedPipeline, width: int, height: int) -> torch.Tensor:
    time_ids = [height, width, 0, 0, height, width]  # original size, crop top-left, target size
    unet = model.pipeline.unet
    expected = unet.add_embedding.linear_1.in_features
    projection = model.pipeline.text_encoder_2.config.projection_dim
    if unet.config.addition_time_embed_dim * len(time_ids) + projection != expected:
        raise IncompatibleStrategyError("model", "SDXL UNet's added embedding size does not match its text encoder")
    return torch.tensor([time_ids], dtype=model.dtype)


class Engine:
    """Generates images for validated requests on models from a ``ModelRegistry``.

    ``limits`` bound every request's resolved steps and size (``check_limits``: the model's defaults
    included); None leaves that to the caller (a server checks each request when it accepts it).

    ``acceleration`` ("none" | "compile", engine/compiled.py) runs every model's UNet and decode as
    compiled static-shape graphs per row bucket (``buckets``, fixed when a model is first compiled);
    a shape without a graph yet runs eagerly while its graph is built in the background."""

    def __init__(self, models: ModelRegistry | None = None, limits: RequestLimits | None = DEFAULT_LIMITS,
                 acceleration: EngineAcceleration = "none", buckets: Sequence[int] | None = None) -> None:
        self.models = models or ModelRegistry.default()
        self.limits = limits
        self.acceleration = check_acceleration(acceleration, "acceleration")
        self.buckets = check_buckets(buckets) if buckets is not None else None

    def resolve_auto(self, request: GenerationRequest) -> GenerationRequest:
        """``"strategy": "auto"`` replaced by the best point of the model's Pareto profile on the device the
        model is loaded on, measured with this engine's acceleration (else eager: upper bounds;
        accel_diffusion.pareto.auto); any other request unchanged."""
        if not request.strategy.is_auto:
            return request
        from accel_diffusion.pareto.auto import resolve_auto

        model = self.models.get(request.model)
        return resolve_auto(request, model.device, models=self.models.ids(), default_size=model.default_size,
                            acceleration=self.acceleration)

    def generate(self, request: GenerationRequest, hooks: GenerationHooks = NO_HOOKS, *,
                 seeds: Sequence[int] | None = None, batch_invariant: bool = False) -> GenerationResult:
        request = self.resolve_auto(request)
        model = self.models.get(request.model)
        if self.limits is not None:
            check_limits(model, request, self.limits)
        if self.acceleration == "compile":
            model.compiled_model(self.buckets)
        return generate(model, request, hooks, seeds=seeds, batch_invariant=batch_invariant,
                        acceleration=self.acceleration)


def generate(model: LoadedPipeline, request: GenerationRequest, hooks: GenerationHooks = NO_HOOKS, *,
             seeds: Sequence[int] | None = None, batch_invariant: bool = False,
             acceleration: EngineAcceleration = "none") -> GenerationResult:
    """The engine's one generation path (txt2img, or img2img when ``request.init_image`` is set).

    ``seeds`` (one per image) replaces ``request.seed + k``: the server uses it to run several
    requests as one batch while every image keeps its own request's seed. ``batch_invariant`` runs
    the model under ``BatchInvariantOps``, so that an image's pixels are the same bits whatever
    else shares its batch (at a cost in speed; see engine/batch_invariance.py). Its attention then runs as
    SDPA under the mode's wrappers, also where the model was loaded with xformers (engine/attention.py:
    ``batch_invariant_attention``), and the result's ``attention_backend`` says "sdpa".

    ``acceleration="compile"`` runs the UNet and the decode through the model's shared ``CompiledModel``
    (engine/compiled.py); not with a runtime component (patch parallelism) or a schedule that changes
    the UNet during the loop (a searched schedule's block skipping): those run eagerly.
    """
    check_acceleration(acceleration, "acceleration")
    if not batch_invariant:
        with torch.no_grad():
            return _generate(model, request, hooks, seeds, acceleration)
    # the model's attention runs as SDPA under the mode's wrappers (xformers' kernel is outside them)
    modules = [getattr(model.pipeline, "unet", None), getattr(model.pipeline, "vae", None), model.tiny_vae]
    with torch.no_grad(), BatchInvariantOps(), batch_invariant_attention([m for m in modules if m is not None]) as \
            backend:
        result = _generate(model, request, hooks, seeds, acceleration)
    result.attention_backend = backend
    return result


def _generate(model: LoadedPipeline, request: GenerationRequest, hooks: GenerationHooks,
              seeds: Sequence[int] | None, acceleration: EngineAcceleration = "none") -> GenerationResult:
    if model.family == "mar":  # the AR loop runs eagerly: its head is an MLP, its transformer small
        return generate_ar(model, request, hooks, seeds)
    t_start = time.perf_counter()
    if model.family not in ("sd", "sdxl"):
        raise InvalidRequestError(
            "model", f"{model.model_id!r} is a {model.family} model, not a text-to-image pipeline"
        )
    check_not_ar(model.spec, request)
    pipe = model.pipeline
    if pipe.unet.config.time_cond_proj_dim is not None:
        raise IncompatibleStrategyError("model", "guidance-embedding (LCM-distilled) UNets are not supported yet")
    prepared = prepare_strategy(model.spec, request.strategy, request.steps)
    prepared.guidance.check_mode(request.init_image is not None)
    check_student(prepared, model.spec, request)
    width, height = _request_size(model, request)
    requested_steps = request.steps or model.spec.default_steps
    scheduler = prepared.sampler.make_scheduler(model.scheduler_config, prepared.schedule.scheduler_options())
    prepared.schedule.check_compatible(scheduler, prepared.strategy.sampler["name"])
    num_steps = prepared.schedule.num_steps(requested_steps)
    try:
        prepared.schedule.set_timesteps(scheduler, num_steps, model.device)
    except ValueError as exc:  # e.g. LCM: more steps than its original_inference_steps
        raise InvalidRequestError("steps", f"{num_steps} steps do not fit sampler "
                                  f"{prepared.strategy.sampler['name']!r}: {exc}") from None
    timesteps = scheduler.timesteps
    steps_run = num_steps

    prompts = [p for p in request.prompts for _ in range(request.n)]
    if seeds is None:
        seeds = image_seeds(request.seed, len(prompts))
    elif len(seeds) != len(prompts) or not all(0 <= s <= MAX_SEED for s in seeds):
        raise InvalidRequestError("seed", f"need {len(prompts)} seeds in [0, 2**63), got {list(seeds)}")
    seeds = list(seeds)
    if prepared.runtime is not None:
        seeds = prepared.runtime.shared_seeds(seeds)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    batch = len(prompts)
    vae = _request_vae(model, request.vae)

    t_encode = time.perf_counter()
    time_ids = _sdxl_time_ids(model, width, height) if model.family == "sdxl" else None
    assert model.prompt_encoder is not None
    conditioning = model.prompt_encoder.conditioning(
        prompts, request.negative_prompt, prepared.guidance.needs_uncond, time_ids
    )

    t_latents = time.perf_counter()
    unet = pipe.unet
    latent_shape = (batch, unet.config.in_channels, height // model.vae_scale_factor, width // model.vae_scale_factor)
    denoiser: Any = unet
    decoder = None
    if prepared.runtime is not None:
        prepared.runtime.check_latent(unet, latent_shape[2], model.vae_scale_factor)
        denoiser = prepared.runtime.wrap(unet)
    if acceleration == "compile":
        compiled = model.compiled_model()
        if prepared.runtime is None and type(prepared.schedule).model_context is Schedule.model_context:
            denoiser = compiled.unet
        decoder = compiled.decoder(vae)
    if request.init_image is None:
        latents = randn_tensor(latent_shape, generator=generators, device=model.device, dtype=model.dtype)
        latents = latents * scheduler.init_noise_sigma
        prepared.guidance.begin(None)
    else:
        init_steps = min(int(num_steps * request.strength), num_steps)
        t_begin = max(num_steps - init_steps, 0)
        steps_run = num_steps - t_begin
        timesteps = timesteps[t_begin * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_begin * scheduler.order)
        if steps_run == 0:
            raise InvalidRequestError(
                "strength", f"{request.strength} x {num_steps} steps leaves no denoising step; raise strength or steps"
            )
        init_latents = _encode(model, _image_to_tensor(request.init_image, width, height), generators, vae)
        prepared.guidance.begin(init_latents)
        noise = randn_tensor(init_latents.shape, generator=generators, device=model.device, dtype=model.dtype)
        latents = scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(batch))

    counters = LoopCounters()
    after_step = None
    if request.preview_every and hooks.on_preview is not None:
        # Previews decode with the model's tiny autoencoder when it has one, whatever the request's
        # vae (as A1111's and ComfyUI's TAESD live previews do): a third of the VAE's cost here.
        preview_vae = model.tiny_vae if model.tiny_vae is not None else vae

        def after_step(step: StepContext, guided: torch.Tensor, current: torch.Tensor) -> None:
            done = step.index + 1
            if done % request.preview_every == 0 and done < step.num_steps:
                # the step's denoised estimate: readable for every sampler (x_t is sigma-scaled for some)
                hooks.on_preview(done, _decode(model, step.predicted_x0(guided), preview_vae))  # type: ignore[misc]

    t_loop = time.perf_counter()
    try:
        with prepared.schedule.model_context(unet):  # e.g. a searched schedule's skipped UNet blocks
            latents = denoise(
                denoiser,
                latents,
                scheduler,
                timesteps,
                prepared.guidance,
                conditioning,
                step_kwargs=_step_kwargs(prepared.sampler, scheduler, generators),
                hooks=hooks,
                counters=counters,
                after_step=after_step,
            )
    finally:
        if prepared.runtime is not None:
            denoiser.detach()
    extra: dict[str, Any] = {"mode": "img2img" if request.init_image is not None else "txt2img"}
    if prepared.runtime is not None:
        extra["communication"] = prepared.runtime.report(denoiser)
    if acceleration == "compile":
        extra["acceleration"] = "compile"
    t_decode = time.perf_counter()
    images = _decode(model, latents, vae, decoder)
    t_end = time.perf_counter()
    return GenerationResult(
        images=images,
        prompts=prompts,
        seeds=seeds,
        model=model.model_id,
        strategy=prepared.strategy,
        steps=steps_run,
        width=width,
        height=height,
        nfe=counters.nfe,
        forward_passes=counters.forward_passes,
        timings={
            "prepare": t_encode - t_start,
            "encode_prompt": t_latents - t_encode,
            "prepare_latents": t_loop - t_latents,
            "denoise": t_decode - t_loop,
            "decode": t_end - t_decode,
            "total": t_end - t_start,
        },
        attention_backend=model.attention_backend,
        extra=extra,
    )


def _step_kwargs(sampler: Sampler, scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
    kwargs = dict(sampler.step_kwargs())
    if "generator" in inspect.signature(scheduler.step).parameters:
        kwargs["generator"] = generators
    return kwargs


def _latent_stats(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel latent mean/std of VAEs that declare them (e.g. some SDXL-family VAEs)."""
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    return torch.tensor(mean).view(1, -1, 1, 1).to(like), torch.tensor(std).view(1, -1, 1, 1).to(like)


def _encode(model: LoadedPipeline, image: torch.Tensor, generators: list[torch.Generator],
            vae: Any = None) -> torch.Tensor:
    """Init image (1, 3, H, W) in [-1, 1] -> one latent per generator (diffusers' img2img encoding)."""
    vae = model.pipeline.vae if vae is None else vae
    return _vae_encode(vae, image.to(model.device), generators).to(model.dtype)


def _vae_encode(vae: Any, pixels: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Pixels in [-1, 1] -> the UNet's latents. An AutoencoderKL gives one posterior sample per generator
    (its mode without generators); a tiny AutoencoderTiny its deterministic latents, once per generator."""
    encoded = vae.encode(pixels.to(vae.dtype))
    if hasattr(encoded, "latent_dist"):
        posterior = encoded.latent_dist
        latents = posterior.mode() if generators is None else torch.cat([posterior.sample(g) for g in generators])
    else:
        latents = encoded.latents
        if generators is not None:
            for generator in generators:  # draw what a posterior sample draws: the seeds' noise stays the same
                randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
            latents = latents.repeat(len(generators), 1, 1, 1)
    return _model_latents(vae, latents)


def _model_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents -> the scaled (and, for VAEs that declare them, normalized) latents the UNet sees."""
    stats = _latent_stats(vae, latents)
    if stats is not None:
        return (latents - stats[0]) * vae.config.scaling_factor / stats[1]
    return latents * vae.config.scaling_factor


def _request_vae(model: LoadedPipeline, kind: str) -> Any:
    """The autoencoder a request asked for: the pipeline's VAE ("full") or the model's tiny one ("tiny")."""
    if kind == "full":
        return model.pipeline.vae
    if model.tiny_vae is None:
        raise InvalidRequestError("vae", f"model {model.model_id!r} declares no tiny autoencoder (tiny_vae)", ["full"])
    return model.tiny_vae


def _vae_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of ``_model_latents``: the UNet's latents -> what the VAE's decoder takes."""
    stats = _latent_stats(vae, latents)
    if stats is not None:
        return latents * stats[1] / vae.config.scaling_factor + stats[0]
    return latents / vae.config.scaling_factor


def _decode(model: LoadedPipeline, latents: torch.Tensor, vae: Any = None, decoder: Any = None) -> np.ndarray:
    """Latents -> float32 (N, H, W, 3) in [0, 1], with the pipeline's VAE unless another (a tiny
    autoencoder of the same latent space) is given; through ``decoder`` (its compiled decode) when given.
    The VAE's precision was fixed at load time."""
    vae = model.pipeline.vae if vae is None else vae
    latents = _vae_latents(vae, latents.to(vae.dtype))
    image = decoder(latents) if decoder is not None else vae.decode(latents, return_dict=False)[0]
    image = (image / 2 + 0.5).clamp(0, 1)
    return image.permute(0, 2, 3, 1).float().cpu().numpy()
