"""Batch manifests: one JSON request per line, validated, keyed and assigned to shards.

A line's *key* is a hash of its normalized request (every field with its default filled in, the
model resolved, aliases such as ``num_inference_steps`` or ``size`` under their canonical names, an
init image by the hash of its bytes, the seed resolved). Results are recorded by it, which is what
makes a rerun skip finished work and lets shards share one output folder. Images are named by the
line's ``id`` where that is unambiguous over the whole manifest (so every shard names them alike),
else by the key. A line without a seed gets one derived from the rest of its request, so that a rerun
(or another shard) makes the same images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from accel_diffusion.errors import InvalidRequestError
from accel_diffusion.imageio import ImageFormat
from accel_diffusion.jsonbody import parse_json
from accel_diffusion.registry import validation_error_to_request_error
from accel_diffusion.strategy import MAX_SEED, GenerationRequest, merge_guidance_scale
from accel_diffusion.text import check_texts
from accel_diffusion.vocabulary import errors_named_as_sent, to_canonical

SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class BatchItem(BaseModel):
    """One manifest line. ``init_image`` is a path, relative to the manifest's folder."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, description="a label of yours, echoed in the results and naming the images")
    model: str | None = None
    prompt: Annotated[str, Field(min_length=1)]
    negative_prompt: str | None = None
    n: Annotated[int, Field(ge=1)] | None = Field(None, description="images (default 1)")
    num_images_per_prompt: Annotated[int, Field(ge=1)] | None = Field(None, description="diffusers' name of n")
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    size: str | None = Field(None, description='"WxH" or "auto"; or width and height')
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    num_inference_steps: int | None = Field(None, description="diffusers' name of steps")
    guidance_scale: float | None = None
    strategy: dict[str, Any] | Literal["auto"] | None = Field(
        None, description='components by kind, or "auto" with latency_budget_ms (the model\'s Pareto profile)')
    latency_budget_ms: float | None = Field(None, description='with strategy "auto": time per image to fit, in ms')
    min_quality: float | None = Field(None, description='with strategy "auto": least quality (the profile\'s metric)')
    ar_iterations: int | None = Field(None, description="autoregressive models (shapes_mar): AR iterations")
    init_image: str | None = None
    strength: float = 0.8
    output_format: ImageFormat = "png"
    output_compression: Annotated[int, Field(ge=0, le=100)] = 100
    vae: Literal["full", "tiny"] = "full"

    @field_validator("id")
    @classmethod
    def _safe_id(cls, value: str | None) -> str | None:
        if value is not None and not SAFE_ID.fullmatch(value):
            raise ValueError(f"{value!r} cannot name files: use 1 to 100 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
        return value

    @model_validator(mode="before")
    @classmethod
    def _check_text(cls, data: Any) -> Any:
        if isinstance(data, dict):  # before the line is hashed and echoed: a lone surrogate cannot be written
            check_texts(data, "", skip=("init_image",))
        return data


@dataclass(frozen=True)
class PlannedRequest:
    """A valid manifest line, normalized: ``request`` holds the fields sent to the engine or server.

    ``name`` names its images (``<name>-<k>.<ext>``): the line's id where ``read_manifest`` found it
    unambiguous, else the key."""

    line: int
    key: str
    item: BatchItem
    request: dict[str, Any]
    init_image: Path | None
    name: str = ""

    @property
    def output_name(self) -> str:
        return self.name or self.key

    @property
    def num_images(self) -> int:
        return int(self.request["n"])

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
    return name_outputs(planned), errors


def name_outputs(planned: list[PlannedRequest]) -> list[PlannedRequest]:
    """Name each request's images by its lines' id when that is unambiguous: all its lines carry the
    same id, and no other request's lines carry it or have it as their key (compared ignoring case, as
    some file systems do). Other requests keep their key."""
    ids_of_key: dict[str, set[str | None]] = {}
    keys_of_id: dict[str, set[str]] = {}
    for p in planned:
        ids_of_key.setdefault(p.key, set()).add(p.item.id)
        if p.item.id is not None:
            keys_of_id.setdefault(p.item.id.casefold(), set()).add(p.key)
    named = []
    for p in planned:
        (label, *others) = ids_of_key[p.key]
        unique = (label is not None and not others and keys_of_id[label.casefold()] == {p.key}
                  and label.casefold() not in ids_of_key)
        named.append(dataclasses.replace(p, name=label if unique else ""))
    return named


def plan_line(number: int, text: str, base_dir: Path, default_model: str) -> PlannedRequest:
    data = parse_json(text, "line")
    if not isinstance(data, dict):
        raise InvalidRequestError("line", "must be a JSON object")
    try:
        item = BatchItem.model_validate(data)
    except ValidationError as exc:
        raise validation_error_to_request_error(exc, model=BatchItem) from None
    sizes, sent = to_canonical(item.model_dump(include={"n", "num_images_per_prompt", "size", "width", "height",
                                                         "steps", "num_inference_steps"}))
    with errors_named_as_sent(sent):  # a bad size names size, a bad num_inference_steps names it
        request, init_path = _normalize(item, sizes, base_dir, default_model)
        planned = PlannedRequest(number, request_key(request), item, request, init_path)
        planned.generation_request()  # the engine's own validation: strategy, sizes, steps, image
    return planned


def _normalize(item: BatchItem, sizes: dict[str, Any], base_dir: Path,
               default_model: str) -> tuple[dict[str, Any], Path | None]:
    """The request of a line, in canonical names (``sizes``: its n, width, height and steps)."""
    width, height = sizes["width"], sizes["height"]
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
        "n": 1 if sizes["n"] is None else sizes["n"], "width": width, "height": height, "steps": sizes["steps"],
        "strategy": strategy,
        "strength": item.strength if init_path is not None else None, "init_image_sha256": init_hash,
        "output_format": item.output_format, "output_compression": item.output_compression,
    }
    if item.vae != "full":  # only when set: the keys of lines without it stay what they were
        request["vae"] = item.vae
    for name in ("latency_budget_ms", "min_quality", "ar_iterations"):  # the same: only when set
        if getattr(item, name) is not None:
            request[name] = getattr(item, name)
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
