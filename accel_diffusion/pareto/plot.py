"""The quality–latency plot of a profile: every point, the front highlighted, the anchors marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accel_diffusion.pareto.profile import ParetoPoint, ParetoProfile
from accel_diffusion.pareto.sweep import anchor_candidates


def _label(point: ParetoPoint, model: str) -> str:
    if point.model != model:
        return f"{point.model} {point.steps}"
    sampler = point.strategy.get("sampler", {}).get("name", "default")
    schedule = point.strategy.get("schedule", {}).get("name", "")
    guidance = point.strategy.get("guidance", {})
    cfg = f" cfg{guidance['scale']:g}" if guidance.get("name") == "cfg" else f" {guidance.get('name', '')}"
    iterations = f" x{point.ar_iterations} AR" if point.ar_iterations is not None else ""
    return f"{sampler}{'/' + schedule if schedule not in ('', 'spacing') else ''}{cfg} {point.steps}{iterations}"


def plot_profile(profile: ParetoProfile, out: str | Path, default_strategy: dict[str, Any] | None = None,
                 default_steps: int | None = None, log_quality: bool = False,
                 default_ar_iterations: int | None = None) -> Path:
    """Write a PNG: latency (log x) vs quality; the front as a step line; anchors and the model's default ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    xs = [p.latency_ms for p in profile.points]
    ys = [p.quality for p in profile.points]
    ax.scatter(xs, ys, s=14, c="#9aa5b1", label="measured strategies", zorder=2)
    front = profile.front_points()
    ax.step([p.latency_ms for p in front], [p.quality for p in front], where="post", c="#d1495b", lw=1.5, zorder=3)
    ax.scatter([p.latency_ms for p in front], [p.quality for p in front], s=28, c="#d1495b", label="Pareto front",
               zorder=4)
    for p in front:
        ax.annotate(_label(p, profile.model), (p.latency_ms, p.quality), fontsize=6, xytext=(3, -9),
                    textcoords="offset points")
    markers = iter(["s", "D", "^", "v"])
    for label, anchor in anchor_candidates(profile.model, default_strategy, default_steps, default_ar_iterations):
        hits = [p for p in profile.points if p.key() == anchor.key()]
        if hits:
            ax.scatter([hits[0].latency_ms], [hits[0].quality], s=80, facecolors="none", edgecolors="#00798c",
                       marker=next(markers), lw=1.5, label=label, zorder=5)
    ax.set_xscale("log")
    if log_quality:
        ax.set_yscale("symlog")
    ax.set_xlabel(f"latency per image at batch 1, ms ({profile.device})")
    ax.set_ylabel(profile.quality_metric)
    ax.set_title(f"{profile.model}: quality vs latency ({len(profile.points)} points, {len(front)} on the front)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
