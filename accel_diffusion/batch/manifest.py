"""Batch manifests: one JSON request per line, validated, keyed and assigned to shards.

A line's *key* is a hash of its normalized request (every field with its default filled in, the
model resolved, an init image by the hash of its bytes, the seed resolved). Outputs are named by it,
which is what makes a rerun skip finished work and lets shards share one output folder. A line
without a seed gets one derived from the rest of its request, so that a rerun (or another shard)
makes the same images.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from accel_diffusion.errors import InvalidRequestError
from accel_diffusion.imageio import ImageFormat
from accel_diffusion.jsonbody import parse_json
from accel_diffusion.registry import validation_error_to_request_error
from accel_diffusion.strategy import MAX_SEED, GenerationRequest, merge_guidance_scale, parse_size


class BatchItem(BaseModel):
    """One manifest line. ``init_image`` is a path, relative to the manifest's folder."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, description="a label of yours, echoed in the results")
    model: str | None = None
    prompt: Annotated[str, Field(min_length=1)]
    negative_prompt: str | None = None
    n: Annotated[int, Field(ge=1)] = 1
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    size: str | None = Field(None, description='"WxH"; or width and height')
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    strategy: dict[str, Any] | None = None
    init_image: str | None = None
    strength: float = 0.8
    output_format: ImageFormat = "png"
    output_compression: Annotated[int, Field(ge=0, le=100)] = 100
    vae: Literal["full", "tiny"] = "full"


@dataclass(frozen=True)
class PlannedRequest:
    """A valid manifest line, normalized: ``request`` holds the fields sent to the engine or server."""

    line: int
    key: str
    item: BatchItem
    request: dict[str, Any]
    init_image: Path | None

    @property
    def num_images(self) -> int:
        return self.item.n

    def generation_request(self) -> GenerationRequest:
        fields = {k: v for k, v in self.request.items()
                  if k not in ("output_format", "output_compression", "init_image_sha256")}
        if self.init_image is not None:
            fields["init_image"] = self.init_image.read_bytes()
        return GenerationRequest.create(**fields)


@dataclass(frozen=True)
class LineError:
    line: int
    field: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "kind": "invalid_line", "field": self.field, "message": self.message}


def read_manifest(path: str | Path, default_model: str) -> tuple[list[PlannedRequest], list[LineError]]:
    """Every non-blank line of ``path`` as a request or an error (with its 1-based line number)."""
    path = Path(path)
    planned: list[PlannedRequest] = []
    errors: list[LineError] = []
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                planned.append(plan_line(number, text, path.parent, default_model))
            except InvalidRequestError as exc:
                errors.append(LineError(number, exc.field, exc.message))
    return planned, errors


def plan_line(number: int, text: str, base_dir: Path, default_model: str) -> PlannedRequest:
    data = parse_json(text, "line")
    if not isinstance(data, dict):
        raise InvalidRequestError("line", "must be a JSON object")
    try:
        item = BatchItem.model_validate(data)
    except ValidationError as exc:
        raise validation_error_to_request_error(exc, model=BatchItem) from None
    request, init_path = _normalize(item, base_dir, default_model)
    planned = PlannedRequest(number, request_key(request), item, request, init_path)
    planned.generation_request()  # the engine's own validation: strategy, sizes, steps, image
    return planned


def _normalize(item: BatchItem, base_dir: Path, default_model: str) -> tuple[dict[str, Any], Path | None]:
    width, height = item.width, item.height
    if item.size is not None:
        if width is not None or height is not None:
            raise InvalidRequestError("size", "give either size or width/height, not both")
        width, height = parse_size(item.size, allow_auto=False)
    strategy = merge_guidance_scale(item.strategy, item.guidance_scale)
    init_path = None
    init_hash = None
    if item.init_image is not None:
        init_path = (base_dir / item.init_image).resolve()
        if not init_path.is_file():
            raise InvalidRequestError("init_image", f"file {item.init_image!r} does not exist")
        init_hash = hashlib.sha256(init_path.read_bytes()).hexdigest()
    request: dict[str, Any] = {
        "model": item.model or default_model, "prompt": item.prompt, "negative_prompt": item.negative_prompt,
        "n": item.n, "width": width, "height": height, "steps": item.steps, "strategy": strategy,
        "strength": item.strength if init_path is not None else None, "init_image_sha256": init_hash,
        "output_format": item.output_format, "output_compression": item.output_compression,
    }
    if item.vae != "full":  # only when set: the keys of lines without it stay what they were
        request["vae"] = item.vae
    request["seed"] = item.seed if item.seed is not None else derived_seed(request)
    engine_fields = {k: v for k, v in request.items() if k != "init_image_sha256" and v is not None}
    return engine_fields | {"init_image_sha256": init_hash}, init_path


def _canonical(request: dict[str, Any]) -> bytes:
    return json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def derived_seed(request: dict[str, Any]) -> int:
    """The seed of a line that gives none: a function of the rest of its request."""
    digest = hashlib.sha256(_canonical({k: v for k, v in request.items() if k != "seed"})).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def request_key(request: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(request)).hexdigest()[:24]


def in_shard(planned: PlannedRequest | LineError, shard_index: int, num_shards: int) -> bool:
    """Requests are dealt to shards by key (stable under reordering and edits of other lines);
    invalid lines by line number, so that exactly one shard reports each."""
    if num_shards == 1:
        return True
    if isinstance(planned, LineError):
        return planned.line % num_shards == shard_index
    return int(planned.key[:15], 16) % num_shards == shard_index
