"""Loading a registry entry into a ``LoadedPipeline`` the engine can run.

Weights are read with diffusers' ``from_pretrained``: safetensors only (``use_safetensors=True``
refuses pickle ``.bin``/``.ckpt`` weights), no remote code, and no network access when
``HF_HUB_OFFLINE=1`` (then only local directories and the local hub cache are read).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import DiffusionPipeline

from accel_diffusion.engine.attention import configure_attention
from accel_diffusion.engine.conditioning import PromptEncoder
from accel_diffusion.errors import ModelLoadError
from accel_diffusion.models.registry import ModelSpec

logger = logging.getLogger(__name__)

Family = Literal["sd", "sdxl", "gmm", "mar"]
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


@dataclass
class LoadedPipeline:
    """A loaded model: its diffusers components plus what the engine needs to drive them."""

    spec: ModelSpec
    pipeline: DiffusionPipeline
    family: Family
    device: torch.device
    dtype: torch.dtype
    attention_backend: str
    load_seconds: float
    prompt_encoder: PromptEncoder | None = None
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    tiny_vae: Any = None  # an AutoencoderTiny of the VAE's latent space (streams, vae="tiny"), when the spec names one
    compiled: dict[str, Any] = field(default_factory=dict, repr=False)  # made on first use, then shared

    @property
    def model_id(self) -> str:
        return self.spec.id

    @property
    def vae_scale_factor(self) -> int:
        vae = getattr(self.pipeline, "vae", None)
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1

    @property
    def default_size(self) -> tuple[int, int]:
        """(width, height) used when a request gives none: the spec's, else the UNet's native size."""
        if self.family == "mar":  # an AR model's images have its token grid's size
            native = int(self.pipeline.config["latent_size"]) * self.vae_scale_factor
            return (native, native)
        native = int(self.pipeline.unet.config.sample_size) * self.vae_scale_factor
        return (self.spec.default_width or native, self.spec.default_height or native)

    def compiled_model(self, buckets: tuple[int, ...] | None = None) -> Any:
        """This model's ``CompiledModel`` (engine/compiled.py: the UNet and decodes as static-shape graphs
        per row bucket), made on first use and then shared by every request, job, batch and stream of the
        model. ``buckets`` fixes the row buckets on that first use (default ``DEFAULT_BUCKETS``); later
        calls get the same object."""
        from accel_diffusion.engine.compiled import DEFAULT_BUCKETS, CompiledModel

        if "engine" not in self.compiled:
            self.compiled["engine"] = CompiledModel(self.pipeline.unet, self.device, buckets or DEFAULT_BUCKETS)
        return self.compiled["engine"]

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.spec.id,
            "family": self.family,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "attention_backend": self.attention_backend,
            "tiny_vae": self.spec.tiny_vae,
            "load_seconds": round(self.load_seconds, 3),
        }


def resolve_device_dtype(spec: ModelSpec) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if spec.device == "auto" else torch.device(
        spec.device
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model {spec.id!r} asks for device {spec.device!r}, but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelLoadError(f"model {spec.id!r} asks for device {spec.device!r}, but there are only "
                             f"{torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"model {spec.id!r} asks for device 'mps', but MPS is not available")
    if spec.dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, spec.dtype)
    return device, dtype


def _refuse_pickle_only(location: str) -> None:
    """A local directory whose weights are only pickles is refused with a clear message."""
    path = Path(location)
    if not path.is_dir():
        return
    has_safetensors = any(path.rglob("*.safetensors"))
    pickles = [p for p in path.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles and not has_safetensors:
        raise ModelLoadError(
            f"{location}: only pickle weights found ({pickles[0].name}); convert them to safetensors — "
            "pickle files can execute code when loaded and are refused"
        )


def detect_family(pipeline: DiffusionPipeline) -> Family:
    """"sd", "sdxl" or "gmm"; anything else (inpainting, upscalers, other architectures) is refused."""
    if hasattr(pipeline, "denoiser") and not hasattr(pipeline, "unet"):
        return "gmm"
    unet, vae = getattr(pipeline, "unet", None), getattr(pipeline, "vae", None)
    tokenizer, text_encoder = getattr(pipeline, "tokenizer", None), getattr(pipeline, "text_encoder", None)
    supported = (
        unet is not None and vae is not None and tokenizer is not None and text_encoder is not None
        and unet.config.in_channels == vae.config.latent_channels == unet.config.out_channels
    )
    if not supported:
        raise ModelLoadError(
            f"{type(pipeline).__name__} is not a supported pipeline: the engine runs text-to-image latent "
            "diffusion pipelines of the Stable Diffusion 1.x/2.x and SDXL families"
        )
    if getattr(pipeline, "text_encoder_2", None) is not None:
        return "sdxl"
    return "sd"


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` read as huggingface_hub reads it (1 / ON / YES / TRUE, any case)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def load_pipeline(spec: ModelSpec) -> LoadedPipeline:
    """Load ``spec`` with ``from_pretrained`` and prepare it for the engine."""
    device, dtype = resolve_device_dtype(spec)
    location = spec.location()
    offline = hub_offline()
    if spec.source != "hub" and not Path(location).is_dir():
        raise ModelLoadError(f"model {spec.id!r}: directory {location!r} does not exist")
    _refuse_pickle_only(location)
    start = time.perf_counter()
    if spec.source != "hub" and (Path(location) / "mar_config.json").is_file():
        return _load_ar(spec, location, device, dtype, start)
    pipeline_cls = _pipeline_class(location, spec)
    try:
        pipeline = pipeline_cls.from_pretrained(
            location,
            revision=spec.revision,
            dtype=dtype,
            use_safetensors=True,
            local_files_only=offline or spec.source != "hub",
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model {spec.id!r} could not be loaded from {location!r}: {exc}") from exc
    pipeline.to(device)
    family = detect_family(pipeline)
    vae = getattr(pipeline, "vae", None)
    if family == "sdxl" and vae is not None and vae.dtype == torch.float16 and vae.config.get("force_upcast"):
        # SDXL's VAE overflows in fp16: keep it in fp32 for good (diffusers upcasts per call; that
        # mutates shared state, which two requests on one model must never see).
        vae.to(torch.float32)
    modules = [m for m in (getattr(pipeline, "unet", None), getattr(pipeline, "vae", None)) if m is not None]
    backend = configure_attention(modules, device, spec.attention) if modules else "none"
    for module in pipeline.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    encoder = PromptEncoder(pipeline, device, dtype) if family in ("sd", "sdxl") else None
    tiny_vae = _load_tiny_vae(spec, pipeline, device, dtype, offline) if spec.tiny_vae else None
    loaded = LoadedPipeline(
        spec=spec,
        pipeline=pipeline,
        family=family,
        device=device,
        dtype=dtype,
        attention_backend=backend,
        load_seconds=time.perf_counter() - start,
        prompt_encoder=encoder,
        scheduler_config=dict(pipeline.scheduler.config),
        tiny_vae=tiny_vae,
    )
    logger.info("loaded %s", loaded.describe())
    return loaded


def _load_ar(spec: ModelSpec, location: str, device: torch.device, dtype: torch.dtype,
             start: float) -> LoadedPipeline:
    """An autoregressive model directory (``accel_diffusion.ar``: ``mar_config.json``)."""
    from accel_diffusion.ar.pipeline import MarPipeline

    try:
        pipeline = MarPipeline.from_pretrained(location)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model {spec.id!r} could not be loaded from {location!r}: {exc}") from exc
    pipeline.to(device, dtype)
    loaded = LoadedPipeline(spec=spec, pipeline=pipeline, family="mar", device=device, dtype=dtype,
                            attention_backend="sdpa", load_seconds=time.perf_counter() - start,
                            prompt_encoder=pipeline.prompt_encoder, scheduler_config=pipeline.head_scheduler_config)
    logger.info("loaded %s", loaded.describe())
    return loaded


def _load_tiny_vae(spec: ModelSpec, pipeline: DiffusionPipeline, device: torch.device, dtype: torch.dtype,
                   offline: bool) -> Any:
    """The spec's ``tiny_vae``: an ``AutoencoderTiny`` whose latents match the pipeline's VAE."""
    from diffusers import AutoencoderTiny

    location = str(spec.tiny_vae_location())
    local = Path(location).is_dir()
    if local:
        _refuse_pickle_only(location)
    try:
        tiny = AutoencoderTiny.from_pretrained(location, dtype=dtype, use_safetensors=True,
                                               revision=None if local else spec.tiny_vae_revision,
                                               local_files_only=offline or local)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model {spec.id!r}: tiny_vae could not be loaded from {location!r}: {exc}") from exc
    vae = getattr(pipeline, "vae", None)
    if vae is None or tiny.config.latent_channels != vae.config.latent_channels:
        raise ModelLoadError(f"model {spec.id!r}: tiny_vae {location!r} does not match the pipeline's VAE latents")
    return tiny.to(device).eval().requires_grad_(False)


def _pipeline_class(location: str, spec: ModelSpec) -> type[DiffusionPipeline]:
    """The pipeline class named in ``model_index.json``: diffusers' own, or this package's oracle."""
    index = Path(location) / "model_index.json"
    if index.is_file():
        try:
            class_name = json.loads(index.read_text()).get("_class_name", "")
        except (ValueError, AttributeError) as exc:  # not JSON, or not an object
            raise ModelLoadError(f"model {spec.id!r}: {str(index)!r} is not a valid model_index.json") from exc
        if class_name == "GmmPipeline":
            from accel_diffusion.models.gmm import GmmPipeline

            return GmmPipeline
    return DiffusionPipeline
