"""Request and response bodies of the HTTP API (OpenAI images API shapes plus the native jobs API)."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from accel_diffusion.server.jobs import OutputOptions
from pydantic import BaseModel, ConfigDict, Field, model_validator

from accel_diffusion.errors import InvalidRequestError
from accel_diffusion.strategy import GenerationRequest, RequestLimits, merge_guidance_scale
from accel_diffusion.vocabulary import check_known

OutputFormat = Literal["png", "jpeg", "webp"]


def decode_base64(field: str, value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(field, "must be base64-encoded image bytes") from None


class OutputFields(BaseModel):
    """How the images of a request are encoded."""

    model_config = ConfigDict(extra="forbid")

    output_format: OutputFormat = "png"
    output_compression: Annotated[int, Field(ge=0, le=100)] = 100

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):  # an unknown field: "did you mean `steps`?"
            check_known(data, cls.model_fields)
        return data

    def output_options(self) -> OutputOptions:
        return OutputOptions(self.output_format, self.output_compression)


# the fields passed on to GenerationRequest as they came (it resolves the aliases and names them in errors)
ENGINE_FIELDS = ("negative_prompt", "n", "num_images_per_prompt", "seed", "size", "width", "height", "steps",
                 "num_inference_steps", "vae", "latency_budget_ms", "min_quality", "ar_iterations")


class GenerationFields(OutputFields):
    """One vocabulary on every route: the engine's names (``steps``, ``width``/``height``, ``n``) and the
    OpenAI/diffusers aliases (``num_inference_steps``, ``size``, ``num_images_per_prompt``); either, not both."""

    model: str | None = None
    negative_prompt: str | None = None
    n: Annotated[int, Field(ge=1, description="images per prompt (default 1)")] | None = None
    num_images_per_prompt: Annotated[int, Field(ge=1, description="diffusers' name of n")] | None = None
    seed: Annotated[int, Field(ge=0)] | None = None
    size: str | None = Field(None, description='"WxH" (multiples of 8) or "auto" (the model\'s default); or '
                             "width and height")
    width: int | None = None
    height: int | None = None
    steps: int | None = Field(None, description="denoising steps (default: the model's)")
    num_inference_steps: int | None = Field(None, description="diffusers' name of steps")
    guidance_scale: float | None = None
    strategy: dict[str, Any] | Literal["auto"] | None = Field(
        None, description='components by kind, or "auto": the best strategy of the model\'s Pareto profile on this '
        "server's device that fits latency_budget_ms")
    vae: Literal["full", "tiny"] = Field("full", description="tiny: the model's TAESD-style autoencoder (faster)")
    latency_budget_ms: float | None = Field(None, description='with strategy "auto": time per image to fit, in ms')
    min_quality: float | None = Field(None, description='with strategy "auto": least quality (the profile\'s metric)')
    ar_iterations: int | None = Field(None, description="autoregressive models (shapes_mar): AR iterations "
                                      "(default: the model's)")

    def _generation_request(self, default_model: str, limits: RequestLimits, **extra: Any) -> GenerationRequest:
        fields = {name: getattr(self, name) for name in ENGINE_FIELDS if getattr(self, name) is not None}
        strategy = merge_guidance_scale(self.strategy, self.guidance_scale)
        return GenerationRequest.create(limits, model=self.model or default_model, strategy=strategy, **fields, **extra)


class OpenAIImageFields(GenerationFields):
    """The fields the OpenAI images routes share, plus diffusion extras as top-level keys."""

    prompt: str
    response_format: Literal["b64_json", "url"] | None = Field(None, description="only b64_json is served")
    quality: str | None = Field(None, description="accepted for compatibility; steps and strategy decide quality")
    background: str | None = None
    user: str | None = None

    def _check_b64_json_only(self) -> None:
        if self.response_format == "url":
            raise InvalidRequestError("response_format", "only b64_json is served", ["b64_json"])


class ImageGenerationRequest(OpenAIImageFields):
    """``POST /v1/images/generations``: OpenAI's fields, plus diffusion extras as top-level keys."""

    style: str | None = None
    moderation: str | None = None
    stream: bool = Field(False, description="not supported here; use POST /v1/jobs and its SSE events")
    partial_images: int | None = None

    def to_generation_request(self, default_model: str, limits: RequestLimits) -> GenerationRequest:
        self._check_b64_json_only()
        if self.stream:
            raise InvalidRequestError("stream", "streaming is served by POST /v1/jobs and GET /v1/jobs/{id}/events")
        return self._generation_request(default_model, limits, prompt=self.prompt)


class ImageEditRequest(OpenAIImageFields):
    """``POST /v1/images/edits`` (img2img): OpenAI's multipart fields, or JSON with a base64 ``image``."""

    image: str = Field(description="base64 image (JSON); in multipart forms the uploaded file")
    mask: str | None = Field(None, description="inpainting masks are not supported")
    input_fidelity: str | None = None
    strength: float = 0.8

    def to_generation_request(self, default_model: str, limits: RequestLimits) -> GenerationRequest:
        if self.mask is not None:
            raise InvalidRequestError("mask", "inpainting is not supported; send the image without a mask")
        self._check_b64_json_only()
        return self._generation_request(default_model, limits, prompt=self.prompt,
                                        init_image=decode_base64("image", self.image), strength=self.strength)


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    seed: int


class ImagesUsage(BaseModel):
    images: int
    nfe_per_image: int
    compute_s: float


class ImagesResponse(BaseModel):
    """OpenAI's response (``created``, ``data``) plus the job id, seeds and usage."""

    created: int
    data: list[ImageData]
    id: str
    seeds: list[int]
    usage: ImagesUsage
    strategy: dict[str, Any] | None = Field(None, description="the strategy that ran (\"auto\" resolved: its "
                                            "choice is under strategy.auto)")


class JobCreateRequest(GenerationFields):
    """``POST /v1/jobs``: the engine's generation request, JSON-shaped (img2img: base64 ``init_image``)."""

    prompt: str | list[str]
    init_image: str | None = Field(None, description="base64 PNG/JPEG/WebP: img2img from this image")
    strength: float = 0.8
    preview_every: Annotated[int, Field(ge=0)] = 0

    def to_generation_request(self, default_model: str, limits: RequestLimits) -> GenerationRequest:
        init = None if self.init_image is None else decode_base64("init_image", self.init_image)
        return self._generation_request(default_model, limits, prompt=self.prompt, init_image=init,
                                        strength=self.strength, preview_every=self.preview_every)


class ErrorDetail(BaseModel):
    type: str
    code: str | None = None
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape."""

    error: ErrorDetail
