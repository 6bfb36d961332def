"""``"strategy": "auto"``: the best point of the model's Pareto profile that fits a latency budget.

The request names a model, ``"strategy": "auto"`` and ``latency_budget_ms`` (per image, on the device
that serves the model), optionally ``min_quality``. Resolution finds the profile of that model on that
device (``pareto.profile.find_profile``), keeps the points whose model is served (a point may be one of
the model's students), and takes the best quality whose latency fits — per image at batch 1 for a
one-image request, at the profile's batch size for more. The request comes back concrete: the point's
strategy and steps (and model, for a student), and ``strategy.auto`` records the choice, so the result
echoes what ran and why. Nothing fits, no profile, another image size: a 400 naming the field.

The profile is the one measured with the serving engine's acceleration (``engine_acceleration``): a
compiling engine uses ``<model>@<device>+compile.json`` and, without one, the eager profile, whose
latencies are then upper bounds (the echo's ``profile_engine_acceleration`` says which was used).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch

from accel_diffusion.errors import InvalidRequestError
from accel_diffusion.pareto.front import best_within, pareto_front
from accel_diffusion.pareto.profile import (
    ParetoProfile,
    ProfileError,
    device_key,
    find_profile,
    profile_dirs,
    profile_file_name,
)
from accel_diffusion.strategy import GenerationRequest, Strategy


def profile_for(model: str, device: torch.device | str, key: str | None = None,
                acceleration: str = "none") -> ParetoProfile:
    """The model's profile on ``device`` (or on the device key ``key``) for an engine running with
    ``acceleration`` (pareto.profile.find_profile), or a 400 saying how to make one."""
    key = key or device_key(device)
    try:
        profile = find_profile(model, key, acceleration)
    except ProfileError as exc:
        raise InvalidRequestError("strategy", f"'auto': the profile of {model!r} on {key} is unusable: {exc}") from None
    if profile is None:
        folders = ", ".join(str(d) for d in profile_dirs())
        compiled = profile_file_name(model, key, "compile")
        if acceleration == "none" and any((folder / compiled).is_file() for folder in profile_dirs()):
            raise InvalidRequestError(
                "strategy", f"'auto': this engine runs eagerly (engine_acceleration none) and {model!r} on {key} has "
                f"only a profile measured compiled ({compiled}), whose latencies the eager engine does not keep: run "
                f"`accel-diffusion bench pareto --model {model}` (eager) on this device, serve with "
                "engine_acceleration compile, or send an explicit strategy")
        raise InvalidRequestError(
            "strategy", f"'auto' needs a Pareto profile of model {model!r} on this device ({key}); none in {folders}: "
            f"run `accel-diffusion bench pareto --model {model}` on this device (or set profiles_dir), or send an "
            "explicit strategy")
    return profile


def _engine_fields(profile: ParetoProfile, acceleration: str) -> dict[str, Any]:
    """What the echo and the models route say of the engines: the serving one, the profile's, and when they
    differ, that the profile's latencies are upper bounds."""
    fields: dict[str, Any] = {"engine_acceleration": acceleration,
                              "profile_engine_acceleration": profile.engine_acceleration}
    autoregressive = bool(profile.points) and all(p.ar_iterations is not None for p in profile.points)
    if profile.engine_acceleration != acceleration and autoregressive:
        fields["latency_note"] = ("an autoregressive model's loop runs eagerly on every engine: the profile's "
                                  "latencies are this engine's")
    elif profile.engine_acceleration != acceleration:
        fields["latency_note"] = (f"no profile measured with engine_acceleration {acceleration} on {profile.device}: "
                                  f"the latencies are the {profile.engine_acceleration} engine's, upper bounds on "
                                  "this faster engine")
    return fields


def choose_point(profile: ParetoProfile, latency_budget_ms: float, min_quality: float | None = None,
                 images: int = 1, models: Collection[str] | None = None) -> int:
    """Index (into ``profile.points``) of the best point that fits; a 400 naming the field when none does."""
    batched = images > 1 and all(p.batch_latency_ms is not None for p in profile.points)
    usable = [i for i, p in enumerate(profile.points) if models is None or p.model in models]
    latency = [float(p.batch_latency_ms if batched else p.latency_ms) for p in profile.points]
    coords = [(latency[i], profile.points[i].quality) for i in usable]
    front = [usable[k] for k in pareto_front(coords, profile.margins_obj())]
    points = [(latency[i], p.quality) for i, p in enumerate(profile.points)]
    chosen = best_within(points, front, latency_budget_ms, min_quality)
    if chosen is not None:
        return chosen
    if not front:
        raise InvalidRequestError("model", f"no point of {profile.file_name} runs on a model served here "
                                  f"(served: {sorted(models or [])})")
    fastest = min(front, key=lambda i: latency[i])
    per = f"per image at batch {profile.batch_size}" if batched else "per image at batch 1"
    fits = [i for i in front if latency[i] <= latency_budget_ms]
    if fits and min_quality is not None:
        best = max(fits, key=lambda i: profile.points[i].quality)
        raise InvalidRequestError(
            "min_quality", f"{min_quality} is not reached within {latency_budget_ms} ms {per} on {profile.device}: "
            f"the best that fits gives {profile.quality_metric} {profile.points[best].quality:.4g} in "
            f"{latency[best]:.1f} ms; lower min_quality or raise latency_budget_ms")
    raise InvalidRequestError(
        "latency_budget_ms", f"{latency_budget_ms} ms {per} is less than any strategy of {profile.model!r} takes on "
        f"{profile.device}: the fastest takes {latency[fastest]:.1f} ms ({profile.quality_metric} "
        f"{profile.points[fastest].quality:.4g}); raise the budget")


def resolve_auto(request: GenerationRequest, device: torch.device | str,
                 models: Collection[str] | None = None,
                 default_size: tuple[int, int] | None = None, key: str | None = None,
                 acceleration: str = "none") -> GenerationRequest:
    """``request`` with ``"strategy": "auto"`` replaced by the chosen point (unchanged if not auto).

    ``device``: where the model runs (``key``: its device key instead, e.g. on a replica without the device);
    ``models``: the model ids that may run (a server's served models); ``default_size``: the (width, height)
    the model generates when the request gives none; ``acceleration``: the serving engine's
    (``engine_acceleration``), which picks the profile."""
    if not request.strategy.is_auto:
        return request
    assert request.latency_budget_ms is not None  # GenerationRequest refuses auto without a budget
    profile = profile_for(request.model, device, key, acceleration)
    if profile.width is not None and profile.height is not None:
        width = request.width or (default_size[0] if default_size else profile.width)
        height = request.height or (default_size[1] if default_size else profile.height)
        if (width, height) != (profile.width, profile.height):
            field = "width" if width != profile.width else "height"
            raise InvalidRequestError(
                field, f"'auto': the profile of {request.model!r} on {profile.device} is measured at "
                f"{profile.width}x{profile.height}, not {width}x{height}; send that size or an explicit strategy")
    index = choose_point(profile, request.latency_budget_ms, request.min_quality, request.num_images, models)
    point = profile.points[index]
    batched = request.num_images > 1 and point.batch_latency_ms is not None
    record: dict[str, Any] = {
        "latency_budget_ms": request.latency_budget_ms,
        "min_quality": request.min_quality,
        "profile": profile.file_name,
        "profile_date": profile.date,
        "device": profile.device,
        "expected_latency_ms": point.batch_latency_ms if batched else point.latency_ms,
        "latency_at_batch": profile.batch_size if batched else 1,
        "quality_metric": profile.quality_metric,
        "expected_quality": point.quality,
        **_engine_fields(profile, acceleration),
    }
    if point.ar_iterations is not None:
        record["ar_iterations"] = point.ar_iterations
    strategy = Strategy.model_validate({**point.strategy, "auto": record})
    return request.model_copy(update={"model": point.model, "strategy": strategy, **point.request_fields()})


def front_summary(model: str, device: torch.device | str, key: str | None = None,
                  acceleration: str = "none") -> dict[str, Any] | None:
    """The model's front on ``device`` (or device key ``key``) for an engine running with ``acceleration``, for
    ``GET /v1/models``; None without a usable profile."""
    try:
        profile = find_profile(model, key or device_key(device), acceleration)
    except ProfileError:
        return None
    if profile is None:
        return None
    return {
        "profile": profile.file_name, "device": profile.device, "date": profile.date,
        "quality_metric": profile.quality_metric, "batch_size": profile.batch_size,
        **_engine_fields(profile, acceleration),
        "points": [{"model": p.model, "strategy": p.strategy, "steps": p.steps, "quality": p.quality,
                    "latency_ms": p.latency_ms, "batch_latency_ms": p.batch_latency_ms, "nfe": p.nfe,
                    **({"ar_iterations": p.ar_iterations} if p.ar_iterations is not None else {})}
                   for p in profile.front_points()],
    }
