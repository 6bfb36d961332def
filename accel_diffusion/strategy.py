"""The two request-side types: ``Strategy`` (one component per kind) and ``GenerationRequest``.

Both are validated once, at the edge (CLI, Python API, server, batch manifests); the engine trusts
them. A ``Strategy`` may be partial: kinds left out are taken from the model's default strategy
(``Strategy.resolved_over``). The resolved strategy is echoed back in every result.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from accel_diffusion.errors import InvalidRequestError
from accel_diffusion.jsonbody import parse_json
from accel_diffusion.registry import ComponentKind, get_registry, validation_error_to_request_error
from accel_diffusion.text import check_texts
from accel_diffusion.vocabulary import aliases_for, check_known, errors_named_as_sent, to_canonical
from accel_diffusion.vocabulary import parse_size as parse_size  # its former home: imports of it keep working

ComponentSpec = dict[str, Any]


class Strategy(BaseModel):
    """A validated choice of one component per kind, each ``{"name": ..., **constructor args}``.

    Fields left as ``None`` mean "the model's default" for sampler, schedule and guidance, and
    "not used" for student and runtime.

    ``auto``: ``True`` (what ``"strategy": "auto"`` parses to) asks for the best point of the model's
    Pareto profile that fits the request's ``latency_budget_ms`` (``accel_diffusion.pareto.auto``); it
    carries no components. Once resolved, the chosen components are set and ``auto`` records the
    choice (budget, profile, expected latency and quality), echoed back with the strategy.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sampler: ComponentSpec | None = None
    schedule: ComponentSpec | None = None
    guidance: ComponentSpec | None = None
    student: ComponentSpec | None = None
    runtime: ComponentSpec | None = None
    auto: bool | dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _check_text(cls, data: Any) -> Any:
        check_texts(data, "strategy")  # names and parameters are echoed back and may reach a tokenizer
        return data

    @model_validator(mode="after")
    def _check_auto(self) -> Strategy:
        if self.auto is False:
            raise ValueError("auto: send \"strategy\": \"auto\" (or leave auto out), not false")
        if self.auto is True:
            given = [k for k in ("sampler", "schedule", "guidance", "student", "runtime") if getattr(self, k)]
            if given:
                raise ValueError(f"auto: 'auto' chooses every component itself; send either \"strategy\": \"auto\" "
                                 f"or components ({', '.join(given)}), not both")
        return self

    @property
    def is_auto(self) -> bool:
        """Whether this strategy still has to be resolved against a Pareto profile."""
        return self.auto is True

    @field_validator("sampler", "schedule", "guidance", "student", "runtime", mode="before")
    @classmethod
    def _normalize_component(cls, value: Any, info: ValidationInfo) -> ComponentSpec | None:
        if value is None:
            return None
        return get_registry().normalize(ComponentKind(info.field_name), value)

    def resolved_over(self, default: Strategy) -> Strategy:
        """This strategy with every unset sampler/schedule/guidance taken from ``default``."""
        if self.is_auto:  # the engine and the server resolve it first (accel_diffusion.pareto.auto)
            raise InvalidRequestError("strategy", "'auto' has not been resolved against the model's Pareto profile")
        missing = {kind: value for kind in ("sampler", "schedule", "guidance", "student", "runtime")
                   if getattr(self, kind) is None and (value := getattr(default, kind)) is not None}
        # both are validated strategies (their components normalized, their texts checked): the merge is one
        # too, without validating every component again (the server does this once per request it accepts)
        return self.model_copy(update=missing) if missing else self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(exclude_none=True), sort_keys=True)

    @classmethod
    def parse(cls, data: str | dict[str, Any] | Strategy | None) -> Strategy:
        """Parse a Strategy from a JSON string, a dict, or pass one through; errors name the field."""
        if isinstance(data, Strategy):
            return data
        if data is None:
            return cls()
        if isinstance(data, str) and data.strip() == "auto":
            return cls(auto=True)
        if isinstance(data, str):
            data = parse_json(data, "strategy")
        if not isinstance(data, dict):
            raise InvalidRequestError("strategy", "must be \"auto\" or a JSON object with keys among",
                                      list(cls.model_fields))
        try:
            return cls.model_validate(data)
        except pydantic.ValidationError as exc:
            raise validation_error_to_request_error(exc, prefix="strategy", model=cls) from None


MAX_SEED = 2**63 - 1  # seeds are torch.Generator seeds: non-negative 64-bit signed integers


class RequestLimits(BaseModel):
    """Configured bounds every request is checked against.

    The defaults are the one definition of the limits of every surface: the Python API, the CLI,
    batch manifests and stream sessions use them, and the server's settings default to them (a
    deployment may change its own)."""

    model_config = ConfigDict(frozen=True)

    max_width: int = 1024
    max_height: int = 1024
    max_pixels: int = 1024 * 1024
    max_steps: int = 150
    max_images: int = 64
    max_prompts: int = 256
    max_prompt_chars: int = 2000
    max_init_image_bytes: int = 16 * 1024 * 1024


DEFAULT_LIMITS = RequestLimits()


def _limits(info: ValidationInfo) -> RequestLimits:
    context = info.context or {}
    return context.get("limits", DEFAULT_LIMITS)


def _check_image_size(size: tuple[int, int], limits: RequestLimits) -> None:
    width, height = size
    if width > limits.max_width or height > limits.max_height or width * height > limits.max_pixels:
        raise ValueError(
            f"is {width}x{height}; at most {limits.max_width}x{limits.max_height} and {limits.max_pixels} pixels "
            "allowed (resize it first)"
        )


class GenerationRequest(BaseModel):
    """One generation: prompts x n images, txt2img, or img2img when ``init_image`` is given.

    Image k (over prompts, then n per prompt) uses seed ``seed + k``, so a batch gives the same
    images as single calls with those seeds (to float rounding: batched kernels differ by ~1e-5).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    model: str = "shapes"
    prompt: str | list[str]
    negative_prompt: str | None = None
    n: Annotated[int, Field(ge=1, description="images per prompt")] = 1
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    strategy: Strategy = Field(default_factory=Strategy)
    init_image: Image.Image | None = None
    strength: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.8
    preview_every: Annotated[int, Field(ge=0)] = 0
    vae: Literal["full", "tiny"] = Field(
        "full", description="the autoencoder for the init image and the output: the pipeline's VAE, or the model's "
        "tiny TAESD-style one (registry tiny_vae; faster, approximate)")
    latency_budget_ms: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        None, description="with strategy 'auto': the time per image the chosen strategy must fit on this device")
    min_quality: Annotated[float, Field(allow_inf_nan=False)] | None = Field(
        None, description="with strategy 'auto': the least quality (the profile's metric, e.g. prompt accuracy)")
    ar_iterations: Annotated[int, Field(ge=1)] | None = Field(
        None, description="autoregressive models (shapes_mar): the AR iterations, 1 .. the model's tokens "
        "(default: the model's)")

    @model_validator(mode="before")
    @classmethod
    def _check_text(cls, data: Any) -> Any:
        """Every text field (prompts, model, strategy, even unknown field names) is valid Unicode: a lone
        surrogate would fail in the tokenizer, or when the request is echoed back as JSON."""
        if isinstance(data, dict):
            check_texts(data, "", skip=("init_image",))  # a path may be any bytes the file system allows
        return data

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str | list[str], info: ValidationInfo) -> str | list[str]:
        limits = _limits(info)
        prompts = [value] if isinstance(value, str) else value
        if not prompts:
            raise ValueError("must contain at least one prompt")
        if len(prompts) > limits.max_prompts:
            raise ValueError(f"has {len(prompts)} prompts; at most {limits.max_prompts} allowed")
        for text in prompts:
            if len(text) > limits.max_prompt_chars:
                raise ValueError(f"is {len(text)} characters long; at most {limits.max_prompt_chars} allowed")
        return value

    @field_validator("negative_prompt")
    @classmethod
    def _check_negative_prompt(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and len(value) > _limits(info).max_prompt_chars:
            raise ValueError(f"is too long; at most {_limits(info).max_prompt_chars} characters allowed")
        return value

    @field_validator("width", "height")
    @classmethod
    def _check_size(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None:
            return None
        limit = _limits(info).max_width if info.field_name == "width" else _limits(info).max_height
        if value < 8 or value > limit or value % 8:
            raise ValueError(f"must be a multiple of 8 between 8 and {limit}, got {value}")
        return value

    @field_validator("steps")
    @classmethod
    def _check_steps(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not 1 <= value <= _limits(info).max_steps:
            raise ValueError(f"must be between 1 and {_limits(info).max_steps}, got {value}")
        return value

    @field_validator("strategy", mode="before")
    @classmethod
    def _parse_strategy(cls, value: Any) -> Strategy:
        return Strategy.parse(value)

    @field_validator("init_image", mode="before")
    @classmethod
    def _load_init_image(cls, value: Any, info: ValidationInfo) -> Image.Image | None:
        if value is None:
            return None
        if isinstance(value, Image.Image):
            _check_image_size(value.size, _limits(info))
            return value.convert("RGB")
        max_bytes = _limits(info).max_init_image_bytes
        try:
            if isinstance(value, bytes | bytearray):
                if len(value) > max_bytes:
                    raise ValueError(f"is {len(value)} bytes; at most {max_bytes} allowed")
                image = Image.open(io.BytesIO(value))
            elif isinstance(value, str | Path):
                path = Path(value)
                if not path.is_file():
                    raise ValueError(f"file {str(path)!r} does not exist")
                if path.stat().st_size > max_bytes:
                    raise ValueError(f"file is {path.stat().st_size} bytes; at most {max_bytes} allowed")
                image = Image.open(path)
            else:
                raise ValueError("must be a PIL image, image bytes or a path to an image file")
            _check_image_size(image.size, _limits(info))  # before decoding: no decompression bombs
            image.load()
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"cannot be read as an image ({exc.__class__.__name__})") from None
        except Image.DecompressionBombError:
            raise ValueError("has too many pixels to decode safely") from None
        return image.convert("RGB")

    @model_validator(mode="after")
    def _check_totals(self, info: ValidationInfo) -> GenerationRequest:
        limits = _limits(info)
        total = len(self.prompts) * self.n
        if total > limits.max_images:
            raise ValueError(f"n: {len(self.prompts)} prompt(s) x n={self.n} = {total} images; "
                             f"at most {limits.max_images} per request")
        if self.width and self.height and self.width * self.height > limits.max_pixels:
            raise ValueError(f"width: width x height = {self.width * self.height} pixels; at most {limits.max_pixels}")
        if self.seed is not None and self.seed + total - 1 > MAX_SEED:  # image k uses seed + k
            raise ValueError(f"seed: seed + images - 1 must stay below 2**63, got {self.seed} for {total} images")
        self._check_auto_fields()
        return self

    def _check_auto_fields(self) -> None:
        if self.strategy.auto is None:
            for name in ("latency_budget_ms", "min_quality"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: only used with \"strategy\": \"auto\"; send that strategy, or leave "
                                     f"{name} out")
        if not self.strategy.is_auto:
            return
        if self.latency_budget_ms is None:
            raise ValueError("latency_budget_ms: \"strategy\": \"auto\" needs a latency budget in ms per image")
        if self.steps is not None:
            raise ValueError("steps: \"strategy\": \"auto\" chooses the steps itself; leave steps out")
        if self.ar_iterations is not None:
            raise ValueError("ar_iterations: \"strategy\": \"auto\" chooses the AR iterations itself (with the "
                             "head's steps); leave ar_iterations out")
        if self.init_image is not None:
            raise ValueError("init_image: \"strategy\": \"auto\" profiles are measured for text-to-image; "
                             "send an explicit strategy for img2img")
        if self.vae != "full":
            raise ValueError("vae: \"strategy\": \"auto\" profiles are measured with the full VAE; leave vae out")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def num_images(self) -> int:
        return len(self.prompts) * self.n

    @classmethod
    def create(cls, limits: RequestLimits | None = None, **fields: Any) -> GenerationRequest:
        """Validate keyword fields into a request; raises InvalidRequestError naming the field."""
        return cls.from_dict(fields, limits)

    @classmethod
    def from_dict(cls, data: dict[str, Any], limits: RequestLimits | None = None) -> GenerationRequest:
        """Also takes the aliases of ``accel_diffusion.vocabulary`` (``num_inference_steps``, ``size``,
        ``num_images_per_prompt``); an error names the field as it was given."""
        check_known(data, cls.model_fields.keys() | aliases_for(cls.model_fields))
        data, sent = to_canonical(data)
        with errors_named_as_sent(sent):
            return cls._validate(data, limits)

    @classmethod
    def _validate(cls, data: dict[str, Any], limits: RequestLimits | None) -> GenerationRequest:
        try:
            return cls.model_validate(data, context={"limits": limits or DEFAULT_LIMITS})
        except InvalidRequestError:
            raise
        except pydantic.ValidationError as exc:
            error = validation_error_to_request_error(exc, model=cls)
            if error.field == "request":
                # model-level checks start with the field they are about: "n: ...", "width: ..."
                field, _, rest = error.message.partition(": ")
                if field in cls.model_fields and rest:
                    raise InvalidRequestError(field, rest) from None
            raise error from None

def guidance_scale_strategy(scale: float) -> dict[str, Any]:
    """Shorthand used by the CLI, the server and batch manifests: plain CFG with this scale."""
    if not isinstance(scale, int | float) or math.isnan(scale) or scale < 0:
        raise InvalidRequestError("guidance_scale", f"must be a number >= 0, got {scale!r}")
    return {"name": "cfg", "scale": float(scale)}


def merge_guidance_scale(strategy: dict[str, Any] | str | None,
                         guidance_scale: float | None) -> dict[str, Any] | str | None:
    """A strategy dict with ``guidance_scale`` as its guidance (giving both is an error)."""
    if guidance_scale is None:
        return strategy
    if strategy == "auto":
        raise InvalidRequestError("guidance_scale", "\"strategy\": \"auto\" chooses the guidance itself; leave "
                                  "guidance_scale out")
    strategy = dict(strategy or {})
    if "guidance" in strategy:
        raise InvalidRequestError("guidance_scale", "give either guidance_scale or strategy.guidance, not both")
    strategy["guidance"] = guidance_scale_strategy(guidance_scale)
    return strategy
