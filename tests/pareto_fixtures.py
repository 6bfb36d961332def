"""Hand-made Pareto profiles for tests of the profile format and of ``"strategy": "auto"``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accel_diffusion.pareto.profile import ParetoPoint, ParetoProfile

CFG5 = {"name": "cfg", "scale": 5.0}
# (strategy, steps, quality, latency ms at batch 1, per image at batch 16)
SHAPES_POINTS: list[tuple[dict[str, Any], int, float, float, float]] = [
    ({"sampler": {"name": "dpmpp_2m"}, "schedule": {"name": "spacing"}, "guidance": {"name": "none"}}, 2, 0.40, 12.0,
     3.0),
    ({"sampler": {"name": "ghvb", "order": 0.8}, "schedule": {"name": "karras", "rho": 3.0}, "guidance": CFG5}, 4, 0.77,
     30.0, 4.0),
    ({"sampler": {"name": "ddim"}, "schedule": {"name": "spacing"}, "guidance": CFG5}, 8, 0.95, 55.0, 9.0),
    ({"sampler": {"name": "dpmpp_2m"}, "schedule": {"name": "spacing"}, "guidance": CFG5}, 25, 0.99, 160.0, 25.0),
    # dominated: slower and worse than the 8-step DDIM point
    ({"sampler": {"name": "euler"}, "schedule": {"name": "spacing"}, "guidance": CFG5}, 8, 0.60, 60.0, 9.5),
]

# three points for the tiny test model: (strategy, steps, quality, ms at batch 1, ms per image at batch 16)
TINY_POINTS: list[tuple[dict[str, Any], int, float, float, float]] = [
    ({"sampler": {"name": "ddim"}, "schedule": {"name": "spacing"}, "guidance": {"name": "none"}}, 1, 0.3, 10.0, 2.0),
    ({"sampler": {"name": "ddim"}, "schedule": {"name": "spacing"}, "guidance": CFG5}, 2, 0.6, 30.0, 5.0),
    ({"sampler": {"name": "dpmpp_2m"}, "schedule": {"name": "spacing"}, "guidance": CFG5}, 3, 0.9, 60.0, 9.0),
]


def make_profile(model: str, device: str, points: list[tuple] | None = None, width: int | None = 32,
                 height: int | None = 32, student: tuple[str, float, float] | None = None) -> ParetoProfile:
    profile = ParetoProfile(model=model, device=device, quality_metric="prompt_accuracy", width=width, height=height,
                            batch_size=16, samples=196)
    for strategy, steps, quality, latency, batch_latency in points or SHAPES_POINTS:
        nfe = steps * (1 if strategy["guidance"]["name"] == "none" else 2)
        profile.add(ParetoPoint(model=model, strategy=strategy, steps=steps, quality=quality, latency_ms=latency,
                                batch_latency_ms=batch_latency, nfe=nfe, metrics={"prompt_accuracy": quality}))
    if student is not None:
        name, quality, latency = student
        profile.add(ParetoPoint(model=name, strategy={}, steps=1, quality=quality, latency_ms=latency,
                                batch_latency_ms=latency / 4, nfe=1))
    return profile


def write_profile(folder: Path, profile: ParetoProfile) -> Path:
    return profile.save(folder / profile.file_name)
