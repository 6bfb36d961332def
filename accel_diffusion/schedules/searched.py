"""A searched schedule (AutoDiffusion): the timesteps of an artifact written by ``accel-diffusion search``.

An artifact is a JSON file ``<id>.json`` recording what it was searched for (model, sampler, guidance,
step count), what it found (timesteps; skipped UNet blocks per step) and how (fitness and its kind,
search cost, seed). It is looked up by id in the configured folder (``ACCEL_DIFFUSION_SCHEDULES_DIR``,
the server's ``schedules_dir``, or :func:`use_schedules_dir`), then among the schedules shipped with
the package. A request naming it for another model, sampler, guidance or step count is refused:
a searched sequence is specific to all four (specs/samplers.md §4.5).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pydantic
import torch
from diffusers import SchedulerMixin
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from accel_diffusion.errors import IncompatibleStrategyError, InvalidRequestError
from accel_diffusion.registry import get_registry, register_component
from accel_diffusion.schedules.base import Schedule
from accel_diffusion.schedules.explicit import ExplicitTimesteps

if TYPE_CHECKING:
    from accel_diffusion.models.registry import ModelSpec
    from accel_diffusion.strategy import Strategy

log = logging.getLogger(__name__)

SCHEDULES_DIR_ENV = "ACCEL_DIFFUSION_SCHEDULES_DIR"
BUILTIN_SCHEDULES_DIR = Path(__file__).parent / "searched"
ARTIFACT_FORMAT = "accel-diffusion/searched-schedule@1"
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"

_configured_dir: Path | None = None


def use_schedules_dir(path: str | Path | None) -> None:
    """Look searched schedules up in ``path`` first (None: back to ``$ACCEL_DIFFUSION_SCHEDULES_DIR``).

    A process-wide setting, like the model registry file: the server sets it once at start-up."""
    global _configured_dir
    _configured_dir = Path(path) if path is not None else None


def schedule_dirs() -> list[Path]:
    """The folders searched, in order: the configured one (if any), then the shipped schedules."""
    configured = _configured_dir or (Path(os.environ[SCHEDULES_DIR_ENV]) if os.environ.get(SCHEDULES_DIR_ENV)
                                     else None)
    return [d for d in (configured, BUILTIN_SCHEDULES_DIR) if d is not None]


class SearchFitness(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field(description="what was minimised, e.g. 'paired_distance', 'teacher_fd', '1-prompt_accuracy'")
    value: float
    samples: Annotated[int, Field(ge=1)] = Field(description="images each candidate was scored on")


class SearchCost(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    evaluations: Annotated[int, Field(ge=0)] = Field(description="candidates scored")
    wall_time_s: Annotated[float, Field(ge=0)]
    command: str = Field("", description="the command that made the artifact")
    skip_budget: float | None = Field(None, description="stage 2's budget: a fraction of the full UNet's time")
    unet_cost: float | None = Field(None, description="the skip plan's UNet time as a fraction of the full UNet's, "
                                    "by the cost model measured at search time")
    seed_timesteps: list[list[int]] = Field(
        default_factory=list, description="the sequences (--seed-timesteps) put in stage 1's generation 0 beside the "
        "uniform schedule and the hand-made grids")


class SearchedArtifact(BaseModel):
    """The JSON an AutoDiffusion search writes; ``timesteps`` largest first, one skip list per step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str = ARTIFACT_FORMAT
    id: Annotated[str, Field(pattern=f"^{ID_PATTERN}$")]
    model: str
    sampler: dict[str, Any]
    guidance: dict[str, Any]
    steps: Annotated[int, Field(ge=1)]
    timesteps: list[Annotated[int, Field(ge=0)]]
    skipped_blocks: list[list[str]] = Field(default_factory=list, description="per step, the UNet blocks skipped")
    skip_mode: Literal["drop", "reuse", "residual"] = Field(
        "drop", description="what a skipped block gives: its skip connection ('drop', AutoDiffusion; artifacts "
        "without the field), its output cached from the last step where it ran ('reuse', DeepCache-style), or its "
        "skip connection plus the residual it added at that step ('residual')")
    block_modes: dict[str, Literal["drop", "reuse", "residual"]] = Field(
        default_factory=dict, description="per skipped block, its own mode (overrides skip_mode for that block; "
        "e.g. residual for ResNet blocks, drop for attention)")
    fitness: SearchFitness
    search: SearchCost
    seed: int

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value != ARTIFACT_FORMAT:
            raise ValueError(f"is {value!r}; this version reads {ARTIFACT_FORMAT!r}")
        return value

    @field_validator("sampler", "guidance")
    @classmethod
    def _normalized(cls, value: dict[str, Any], info: pydantic.ValidationInfo) -> dict[str, Any]:
        return get_registry().normalize(info.field_name, value)

    @model_validator(mode="after")
    def _consistent(self) -> SearchedArtifact:
        if len(self.timesteps) != self.steps:
            raise ValueError(f"timesteps: {len(self.timesteps)} given for steps = {self.steps}")
        if any(a <= b for a, b in zip(self.timesteps, self.timesteps[1:], strict=False)):
            raise ValueError("timesteps: must be strictly decreasing")
        if self.skipped_blocks and len(self.skipped_blocks) != self.steps:
            raise ValueError(f"skipped_blocks: {len(self.skipped_blocks)} lists given for steps = {self.steps}")
        skipped = {name for step in self.skipped_blocks for name in step}
        idle = sorted(set(self.block_modes) - skipped)
        if idle:
            raise ValueError(f"block_modes: {idle[0]!r} is not skipped at any step (skipped_blocks); leave it out")
        cached = [name for name in (self.skipped_blocks[0] if self.skipped_blocks else [])
                  if self.mode_of(name) != "drop"]
        if cached:
            where = "block_modes" if cached[0] in self.block_modes else "skip_mode"
            raise ValueError(f"skipped_blocks: step 0 reuses {cached[0]!r}, but with {where} "
                             f"{self.mode_of(cached[0])!r} the first step runs every block (nothing is cached yet): "
                             "make its list empty")
        return self

    def mode_of(self, block: str) -> str:
        """The mode ``block`` is skipped in: its own (``block_modes``), else ``skip_mode``."""
        return self.block_modes.get(block, self.skip_mode)

    def modes(self) -> str | dict[str, str]:
        """What the block-skip hook takes as its mode: ``skip_mode``, or every skipped block's own mode."""
        if not self.block_modes:
            return self.skip_mode
        return {name: self.mode_of(name) for step in self.skipped_blocks for name in step}

    def save(self, folder: str | Path) -> Path:
        """Write ``<folder>/<id>.json`` (atomically) and return its path."""
        path = Path(folder) / f"{self.id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    def summary(self) -> dict[str, Any]:
        """What a listing shows (``GET /v1/schedules``)."""
        return {"id": self.id, "model": self.model, "sampler": self.sampler, "guidance": self.guidance,
                "steps": self.steps, "timesteps": self.timesteps, "skipped_blocks": self.skipped_blocks,
                "skip_mode": self.skip_mode, "block_modes": self.block_modes,
                "fitness": self.fitness.model_dump(), "search": self.search.model_dump(), "seed": self.seed}


def load_artifact(path: str | Path) -> SearchedArtifact:
    """Read and validate one artifact file; ValueError naming the file and the field otherwise."""
    path = Path(path)
    try:
        artifact = SearchedArtifact.model_validate_json(path.read_text(encoding="utf-8"))
    except (pydantic.ValidationError, InvalidRequestError) as exc:
        raise ValueError(f"searched schedule {str(path)!r} is not a valid artifact: {_first_error(exc)}") from None
    if artifact.id != path.stem:
        raise ValueError(f"searched schedule {str(path)!r} has id {artifact.id!r}; its file must be {artifact.id}.json")
    return artifact


def _first_error(exc: Exception) -> str:
    if isinstance(exc, pydantic.ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return (f"{where}: " if where else "") + first["msg"].removeprefix("Value error, ")
    return str(exc)


def list_artifacts() -> list[SearchedArtifact]:
    """Every valid artifact, by id (a configured folder's shadows a shipped one of the same id); an invalid
    file is logged and left out."""
    found: dict[str, SearchedArtifact] = {}
    for folder in schedule_dirs():
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.json")):
            if path.stem in found or not re.fullmatch(ID_PATTERN, path.stem):
                continue
            try:
                found[path.stem] = load_artifact(path)
            except ValueError as exc:
                log.warning("%s", exc)
    return [found[k] for k in sorted(found)]


def find_artifact(schedule_id: str) -> SearchedArtifact:
    for folder in schedule_dirs():
        path = folder / f"{schedule_id}.json"
        if path.is_file():
            try:
                return load_artifact(path)
            except ValueError as exc:
                raise InvalidRequestError("strategy.schedule.id", str(exc)) from None
    known = [a.id for a in list_artifacts()]
    raise InvalidRequestError("strategy.schedule.id", f"no searched schedule {schedule_id!r}"
                              + ("" if known else " (none are installed: run `accel-diffusion search`)"),
                              known or None)


@register_component("schedule", "searched")
class SearchedSchedule(Schedule):
    """The timesteps found by an AutoDiffusion search, from its artifact (by id); only for the model, sampler,
    guidance and step count it was searched for."""

    def __init__(self, id: Annotated[str, Field(pattern=f"^{ID_PATTERN}$")]) -> None:
        self.id = id
        self.artifact = find_artifact(id)
        self._timesteps = ExplicitTimesteps(self.artifact.timesteps)

    def num_steps(self, requested_steps: int) -> int:
        return self.artifact.steps

    def check_compatible(self, scheduler: SchedulerMixin, sampler_name: str) -> None:
        self._timesteps.check_compatible(scheduler, sampler_name)

    def set_timesteps(self, scheduler: SchedulerMixin, num_steps: int, device: torch.device) -> None:
        self._timesteps.set_timesteps(scheduler, num_steps, device)

    def model_context(self, unet: torch.nn.Module) -> contextlib.AbstractContextManager[Any]:
        """The UNet skips, at each step's timestep, the blocks the artifact lists for that step (dropped or reused,
        as its ``skip_mode`` and ``block_modes`` say; a new cache per generation)."""
        if not any(self.artifact.skipped_blocks):
            return contextlib.nullcontext()
        from accel_diffusion.engine.block_skip import BlockSkip

        skips = dict(zip(self.artifact.timesteps, self.artifact.skipped_blocks, strict=True))
        try:
            return BlockSkip(unet, skips, mode=self.artifact.modes())  # type: ignore[arg-type]
        except ValueError as exc:
            raise IncompatibleStrategyError("strategy.schedule.id", f"searched schedule {self.id!r}: {exc}") from None

    def check_model(self, spec: ModelSpec) -> None:
        """Every block the artifact skips is a skippable block of the model's UNet (read from its config)."""
        names = {name for step in self.artifact.skipped_blocks for name in step}
        if not names:
            return
        from accel_diffusion.engine.block_skip import model_unet_blocks

        known = model_unet_blocks(spec.location(), spec.revision)
        if known is None:  # no config to read before loading: the engine checks the loaded UNet
            return
        unknown = sorted(names - set(known))
        if unknown:
            step = next(k for k, step in enumerate(self.artifact.skipped_blocks) if unknown[0] in step)
            raise IncompatibleStrategyError(
                "strategy.schedule.id", f"searched schedule {self.id!r} skips {unknown[0]!r} at step {step} "
                f"(skipped_blocks), which the UNet of model {spec.id!r} does not have (its blocks: {', '.join(known)})")

    def check_request(self, model_id: str, strategy: Strategy, steps: int | None) -> None:
        artifact, what = self.artifact, f"searched schedule {self.id!r} was made for"
        if model_id != artifact.model:
            raise IncompatibleStrategyError("model", f"{what} model {artifact.model!r}, not {model_id!r}",
                                            [artifact.model])
        for kind in ("sampler", "guidance"):
            ours, theirs = getattr(artifact, kind), getattr(strategy, kind)
            if ours != theirs:
                field = f"strategy.{kind}.name" if ours["name"] != theirs["name"] else f"strategy.{kind}"
                raise IncompatibleStrategyError(field, f"{what} {kind} {json.dumps(ours)}, not {json.dumps(theirs)}",
                                                json.dumps(ours))
        if steps is not None and steps != artifact.steps:
            raise IncompatibleStrategyError("steps", f"{what} {artifact.steps} steps, not {steps}: send steps = "
                                            f"{artifact.steps} or leave steps out", str(artifact.steps))
