"""A model's measured quality–latency profile on one device: every point, the front, how it was made.

``accel-diffusion bench pareto`` writes it; ``"strategy": "auto"`` reads it. A profile is specific to a
model and a device: latencies measured on one CPU say nothing of a GPU, or of the same CPU with more
threads, so the file is named ``<model>@<device key>.json`` and looked up by both (the configured
folder — ``ACCEL_DIFFUSION_PROFILES_DIR``, the server's ``profiles_dir`` or :func:`use_profiles_dir` —
first, then the profiles shipped with the package).

A profile also records the engine acceleration its latencies were measured with (``engine_acceleration``:
``none``, eager; ``compile``, engine/compiled.py). A compiled profile is ``<model>@<device key>+compile.json``
next to the eager one. An engine that compiles looks up the compiled profile first and falls back to the
eager one, whose latencies are then upper bounds (the compiled engine is the faster); an eager engine
never uses a compiled profile (its latencies would be promises the eager engine cannot keep). Format
``@1`` (before the field) reads as ``engine_acceleration = "none"``: it was measured eager.
"""

from __future__ import annotations

import json
import os
import platform
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from accel_diffusion.pareto.front import Margins, pareto_front

PROFILE_FORMAT = "accel-diffusion/pareto-profile@2"
OLD_FORMATS = ("accel-diffusion/pareto-profile@1",)  # read as engine_acceleration = "none" (measured eager)
ACCELERATIONS = ("none", "compile")
PROFILES_DIR_ENV = "ACCEL_DIFFUSION_PROFILES_DIR"
BUILTIN_PROFILES_DIR = Path(__file__).parent / "profiles"

_configured_dir: Path | None = None


class ProfileError(ValueError):
    """A profile file that cannot be used (unreadable, another format version, inconsistent)."""


def use_profiles_dir(path: str | Path | None) -> None:
    """Look profiles up in ``path`` first (None: back to ``$ACCEL_DIFFUSION_PROFILES_DIR``); process-wide."""
    global _configured_dir
    _configured_dir = Path(path) if path is not None else None


def profile_dirs() -> list[Path]:
    configured = _configured_dir or (Path(os.environ[PROFILES_DIR_ENV]) if os.environ.get(PROFILES_DIR_ENV) else None)
    return [d for d in (configured, BUILTIN_PROFILES_DIR) if d is not None]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_key(device: torch.device | str, threads: int | None = None) -> str:
    """What a latency was measured on: ``cuda-nvidia-h200``, ``cpu-x86_64-2t`` (architecture and torch
    threads: the same CPU with more threads is another device for latency), ``mps``."""
    device = torch.device(device)
    if device.type == "cuda":
        return "cuda-" + _slug(torch.cuda.get_device_name(device))
    if device.type == "cpu":
        return f"cpu-{_slug(platform.machine())}-{threads or torch.get_num_threads()}t"
    return _slug(device.type)


def hardware_info(device: torch.device | str) -> dict[str, Any]:
    device = torch.device(device)
    info: dict[str, Any] = {"device": str(device), "machine": platform.machine(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
        info["cpu_model"] = model
    except (OSError, StopIteration):
        info["cpu_model"] = platform.processor() or "unknown"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


def software_versions() -> dict[str, str]:
    import diffusers

    import accel_diffusion

    return {"accel_diffusion": getattr(accel_diffusion, "__version__", "unknown"), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "python": platform.python_version()}


class ParetoPoint(BaseModel):
    """One measured configuration. ``model`` is the profiled model or one of its students."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    strategy: dict[str, Any] = Field(description="the Strategy's components, as a request sends them")
    steps: Annotated[int, Field(ge=1)]
    quality: float = Field(description="the profile's quality_metric (higher is better)")
    metrics: dict[str, float] = Field(default_factory=dict, description="everything measured at this point")
    latency_ms: Annotated[float, Field(gt=0)] = Field(description="per image at batch 1, warm median, decode included")
    batch_latency_ms: Annotated[float, Field(gt=0)] | None = Field(
        None, description="per image at the profile's batch_size, warm median")
    nfe: Annotated[int, Field(ge=0)]
    quality_reused: bool = Field(False, description="quality and metrics copied from the profile named in the "
                                 "profile's quality_reused_from (the same images: see there), not measured here")
    ar_iterations: Annotated[int, Field(ge=1)] | None = Field(
        None, description="autoregressive models (shapes_mar): the AR iterations of this point (None: not AR)")

    def key(self) -> str:
        """What identifies the configuration (not its measurements): model, strategy, steps (and AR iterations)."""
        return configuration_key(self.model, self.strategy, self.steps, self.ar_iterations)

    def request_fields(self) -> dict[str, Any]:
        """The request fields that run this point (besides model and strategy): see :func:`request_fields`."""
        return request_fields(self.strategy, self.steps, self.ar_iterations)


def configuration_key(model: str, strategy: dict[str, Any], steps: int | None,
                      ar_iterations: int | None = None) -> str:
    """A configuration's identity in a profile (``steps`` None: its family's, the same at every step count);
    ``ar_iterations`` only where set (so keys of profiles written before AR models stay what they were: a resumed
    sweep recognises its points)."""
    fields: dict[str, Any] = {"model": model, "strategy": strategy}
    if steps is not None:
        fields["steps"] = steps
    if ar_iterations is not None:
        fields["ar_iterations"] = ar_iterations
    return json.dumps(fields, sort_keys=True)


def request_fields(strategy: dict[str, Any], steps: int, ar_iterations: int | None = None) -> dict[str, Any]:
    """``steps`` and ``ar_iterations`` as a request sends them for a point. A point's ``steps`` is the request's,
    except under the AR head schedule ``disa``, which decides the head's steps itself (a request with steps is
    refused): there the point's ``steps`` is the annealer's ``upper`` (what the sweep varies) and the request
    sends none."""
    schedule = strategy.get("schedule") or {}
    return {"steps": None if schedule.get("name") == "disa" else steps, "ar_iterations": ar_iterations}


class ParetoProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = PROFILE_FORMAT
    model: str
    device: str = Field(description="device key (pareto.profile.device_key)")
    engine_acceleration: Literal["none", "compile"] = Field(
        "none", description="the engine acceleration the latencies were measured with (engine/compiled.py)")
    compile_buckets: list[int] | None = Field(
        None, description="with engine_acceleration = 'compile': the engine's row buckets (rows over the largest "
        "run eagerly, in the measurement as when serving)")
    quality_reused_from: dict[str, Any] | None = Field(
        None, description="where the points marked quality_reused got their quality: another profile's file, date "
        "and versions, and why the images are the same")
    hardware: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    date: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    width: int | None = None
    height: int | None = None
    quality_metric: str
    quality_description: str = ""
    batch_size: Annotated[int, Field(ge=1)] = 16
    seed: int = 0
    samples: Annotated[int, Field(ge=1)] = Field(1, description="images (or points) each quality is measured on")
    margins: dict[str, float] = Field(default_factory=lambda: {"latency": 0.05, "quality": 0.0})
    points: list[ParetoPoint] = Field(default_factory=list)
    front: list[int] = Field(default_factory=list, description="indices of points on the front, fastest first")
    skipped: list[dict[str, Any]] = Field(default_factory=list, description="candidates pruned, and why")
    complete: bool = False
    wall_time_s: float = 0.0
    command: str = ""

    @model_validator(mode="before")
    @classmethod
    def _check_format(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        version = data.get("format", PROFILE_FORMAT)
        if version in OLD_FORMATS:  # before engine_acceleration: measured with the eager engine
            if "engine_acceleration" in data:
                raise ValueError(f"format {version!r} has no engine_acceleration; write format {PROFILE_FORMAT!r}")
            return {**data, "format": PROFILE_FORMAT, "engine_acceleration": "none"}
        if version != PROFILE_FORMAT:
            raise ValueError(f"format is {data.get('format')!r}; this version reads {PROFILE_FORMAT!r} (and "
                             f"{', '.join(map(repr, OLD_FORMATS))}): re-run `accel-diffusion bench pareto` to write a "
                             "current profile")
        return data

    @model_validator(mode="after")
    def _check_front(self) -> ParetoProfile:
        expected = self.compute_front()
        if self.front and self.front != expected:
            raise ValueError(f"front {self.front} is not the front of its points ({expected}): the file was edited "
                             "by hand; re-run `accel-diffusion bench pareto`")
        self.front = expected
        return self

    def margins_obj(self) -> Margins:
        return Margins(**self.margins)

    def compute_front(self) -> list[int]:
        return pareto_front([(p.latency_ms, p.quality) for p in self.points], self.margins_obj())

    def add(self, point: ParetoPoint) -> None:
        """Add (or replace: same configuration) a measured point and recompute the front."""
        self.points = [p for p in self.points if p.key() != point.key()] + [point]
        self.front = self.compute_front()

    def forget(self, model: str) -> None:
        """Drop every point (and pruning record) of ``model``, so a resumed sweep measures them again."""
        self.points = [p for p in self.points if p.model != model]
        self.skipped = [s for s in self.skipped if json.loads(s["key"])["model"] != model]
        self.front = self.compute_front()
        self.complete = False

    def front_points(self) -> list[ParetoPoint]:
        return [self.points[i] for i in self.front]

    @property
    def file_name(self) -> str:
        return profile_file_name(self.model, self.device, self.engine_acceleration)

    def save(self, path: str | Path) -> Path:
        """Write atomically (a resumed sweep rereads it: never a half-written file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.model_dump(), indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ParetoProfile:
        path = Path(path)
        try:
            return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProfileError(f"{str(path)!r} cannot be read as a profile: {exc}") from None
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "profile"
            raise ProfileError(f"{str(path)!r}: {where}: {first['msg']}") from None


def profile_file_name(model: str, device: str, acceleration: str = "none") -> str:
    """``<model>@<device>.json`` (eager), ``<model>@<device>+compile.json`` (measured compiled)."""
    return f"{model}@{device}{'' if acceleration == 'none' else '+' + acceleration}.json"


def find_profile(model: str, device: str, acceleration: str = "none") -> ParetoProfile | None:
    """The profile of ``model`` on ``device`` (a device key) for an engine running with ``acceleration``:
    a profile measured with that acceleration in any folder (configured folder first), else (``compile``)
    the eager profile, whose latencies are upper bounds; None if there is none. An eager engine never
    gets a compiled profile. A file whose content says another acceleration than its name is a ProfileError."""
    if acceleration not in ACCELERATIONS:
        raise ValueError(f"acceleration must be one of {list(ACCELERATIONS)}, got {acceleration!r}")
    for wanted in dict.fromkeys((acceleration, "none")):
        for folder in profile_dirs():
            path = folder / profile_file_name(model, device, wanted)
            if path.is_file():
                profile = ParetoProfile.load(path)
                if profile.engine_acceleration != wanted:
                    raise ProfileError(f"{str(path)!r}: engine_acceleration is {profile.engine_acceleration!r} but "
                                       f"the name says {wanted!r}; rename it {profile.file_name!r}")
                return profile
    return None


def list_profiles(model: str | None = None) -> list[ParetoProfile]:
    """Every readable profile (of ``model``), the configured folder's shadowing shipped ones of the same name."""
    found: dict[str, ParetoProfile] = {}
    for folder in profile_dirs():
        for path in sorted(folder.glob("*@*.json")) if folder.is_dir() else []:
            if path.name in found:
                continue
            try:
                profile = ParetoProfile.load(path)
            except ProfileError:
                continue
            if model is None or profile.model == model:
                found[path.name] = profile
    return list(found.values())
