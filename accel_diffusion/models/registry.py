"""Model registry: model ids -> where the weights come from, dtype/device, and default strategy.

Models are declared in a TOML file (the built-ins in ``models.toml`` by default). Loading goes
through diffusers' ``from_pretrained`` on a local directory or a hub id + revision, safetensors only,
never ``trust_remote_code``; with ``HF_HUB_OFFLINE=1`` nothing is fetched.
"""

from __future__ import annotations

import os
import re
import threading
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from accel_diffusion.errors import InvalidRequestError, UnknownModelError
from accel_diffusion.registry import validation_error_to_request_error
from accel_diffusion.strategy import Strategy

BUILTIN_DIR = Path(__file__).parent / "builtin"
DEFAULT_MODELS_FILE = Path(__file__).parent / "models.toml"
MODELS_FILE_ENV = "ACCEL_DIFFUSION_MODELS"


class ModelSpec(BaseModel):
    """One registry entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    source: Literal["builtin", "local", "hub"]
    path: str | None = Field(None, description="built-in name (source=builtin) or directory (source=local)")
    hub_id: str | None = None
    revision: str | None = Field(None, description="hub revision (commit, tag or branch); pin it in production")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = Field("auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1', ...")
    attention: Literal["auto", "sdpa", "xformers"] = "auto"
    tiny_vae: str | None = Field(
        None, description="a TAESD-style AutoencoderTiny of the same latent space (stream sessions, requests "
        "with vae=tiny): the name of a built-in model directory, a local directory, or a hub id")
    tiny_vae_revision: str | None = Field(None, description="hub revision of a hub tiny_vae; pin it in production")
    description: str = ""
    default_steps: Annotated[int, Field(ge=1, le=1000)] = 25
    default_width: Annotated[int, Field(ge=8, le=8192)] | None = None
    default_height: Annotated[int, Field(ge=8, le=8192)] | None = None
    default_strategy: Strategy = Field(
        default_factory=lambda: Strategy(sampler={"name": "dpmpp_2m"}, schedule={"name": "spacing"},
                                         guidance={"name": "cfg", "scale": 7.5})
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError(f"must be 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N', got {value!r}")
        return value

    @field_validator("default_strategy", mode="before")
    @classmethod
    def _strategy(cls, value: Any) -> Strategy:
        return Strategy.parse(value)

    @model_validator(mode="after")
    def _check_source(self) -> ModelSpec:
        if self.source in ("builtin", "local") and not self.path:
            raise ValueError(f"source={self.source!r} needs 'path'")
        if self.source == "hub" and not self.hub_id:
            raise ValueError("source='hub' needs 'hub_id'")
        missing = [k for k in ("sampler", "schedule", "guidance") if getattr(self.default_strategy, k) is None]
        if missing:
            raise ValueError(f"default_strategy must set {', '.join(missing)}")
        return self

    def location(self) -> str:
        """The directory or hub id that ``from_pretrained`` receives."""
        if self.source == "builtin":
            return str(BUILTIN_DIR / str(self.path))
        if self.source == "local":
            return str(Path(str(self.path)).expanduser())
        return str(self.hub_id)

    def tiny_vae_location(self) -> str | None:
        """Where ``tiny_vae`` loads from: a built-in directory of that name, else a local directory, else a hub id."""
        if self.tiny_vae is None:
            return None
        if (BUILTIN_DIR / self.tiny_vae).is_dir():
            return str(BUILTIN_DIR / self.tiny_vae)
        local = Path(self.tiny_vae).expanduser()
        return str(local) if local.is_dir() else self.tiny_vae


class ModelRegistry:
    """The declared models, and the pipelines loaded so far (each loaded once, on first use)."""

    def __init__(self, specs: list[ModelSpec]) -> None:
        self.specs = {spec.id: spec for spec in specs}
        self._loaded: dict[str, Any] = {}
        self._load_locks = {model_id: threading.Lock() for model_id in self.specs}

    @classmethod
    def from_file(cls, path: str | Path | None = None) -> ModelRegistry:
        """Read a TOML model file: ``[models.<id>]`` tables with ModelSpec fields."""
        path = Path(path or os.environ.get(MODELS_FILE_ENV) or DEFAULT_MODELS_FILE)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InvalidRequestError("models_file", f"{str(path)!r} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise InvalidRequestError("models_file", f"{str(path)!r} is not valid TOML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:  # a directory, unreadable, not UTF-8
            raise InvalidRequestError("models_file", f"{str(path)!r} cannot be read: {exc}") from None
        models = data.get("models", {})
        if not isinstance(models, dict) or not all(isinstance(e, dict) for e in models.values()):
            raise InvalidRequestError("models_file", f"{str(path)!r}: declare each model as a [models.<id>] table")
        specs = []
        for model_id, entry in models.items():
            if "id" in entry:  # the table name is the id; an "id" key could silently shadow another model
                raise InvalidRequestError(f"models.{model_id}.id", "the id is the table name [models.<id>]; "
                                          "remove the 'id' key")
            try:
                specs.append(ModelSpec.model_validate({"id": model_id, **entry}))
            except pydantic.ValidationError as exc:
                raise validation_error_to_request_error(exc, prefix=f"models.{model_id}", model=ModelSpec) from None
            except InvalidRequestError as exc:  # from the default strategy's components
                raise InvalidRequestError(f"models.{model_id}.default_{exc.field}", exc.message, exc.allowed) from None
        if not specs:
            raise InvalidRequestError("models_file", f"{str(path)!r} declares no [models.<id>] tables")
        return cls(specs)

    @classmethod
    def default(cls) -> ModelRegistry:
        return cls.from_file(None)

    def spec(self, model_id: str) -> ModelSpec:
        try:
            return self.specs[model_id]
        except KeyError:
            raise UnknownModelError("model", f"unknown model {model_id!r}", sorted(self.specs)) from None

    def ids(self) -> list[str]:
        return sorted(self.specs)

    def get(self, model_id: str) -> Any:
        """The loaded pipeline of ``model_id`` (a ``LoadedPipeline``), loading it on first use."""
        spec = self.spec(model_id)
        if model_id in self._loaded:
            return self._loaded[model_id]
        with self._load_locks[model_id]:  # one load per model; other models stay available meanwhile
            if model_id not in self._loaded:
                from accel_diffusion.models.loading import load_pipeline

                self._loaded[model_id] = load_pipeline(spec)
            return self._loaded[model_id]
