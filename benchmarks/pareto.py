"""Pareto benchmark: what `"strategy": "auto"` reaches under a latency budget vs the diffusers default sampler.

    python benchmarks/pareto.py --profile accel_diffusion/pareto/profiles/shapes@<device>.json \\
        --out benchmarks/results/pareto_cpu.json [--plot-dir docs/images]

1. shapes: for budgets of 20, 50, 100 and 300 ms per image (batch 1, this device, the engine acceleration the
   profile was measured with: `+compile.json` times the compiled engine), `auto` resolves against the
   profile; the baseline is diffusers' default multistep solver (DPM-Solver++ 2M on the model's spacing, the
   model's CFG 5) at the largest step count whose latency, measured in this same run, fits the same budget.
   Both are then measured in this run by the sweep's own `ShapesMeter` on held-out seeds (seed 10_000 + k, never
   the profile's): prompt accuracy over the 196 prompts, out-of-gamut %, paired distance to the model's default
   at 50 steps from the same noise, and their latency (warm median of 7 at batch 1, decode included).
   Target: auto strictly better at every budget, and >= 0.85 at 20 ms.
2. gmm: mean endpoint error vs NFE of every sampler of the samplers benchmark (results/samplers_cpu.json) and
   the front over NFE (the best sampler at each NFE): the plot docs/benchmarks.md embeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")


sys.path.insert(0, str(Path(__file__).parent))
from engine import machine

from accel_diffusion.engine import Engine
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.pareto.auto import choose_point
from accel_diffusion.pareto.front import pareto_front
from accel_diffusion.pareto.plot import plot_profile
from accel_diffusion.pareto.profile import ParetoProfile
from accel_diffusion.pareto.sweep import Candidate, ShapesMeter

BUDGETS_MS = (20, 50, 100, 300)
HELD_OUT_SEED = 10_000
BASELINE = {"sampler": {"name": "dpmpp_2m"}, "schedule": {"name": "spacing"}, "guidance": {"name": "cfg", "scale": 5.0}}
BASELINE_STEPS = tuple(range(1, 51))


def measure(meter: ShapesMeter, candidate: Candidate) -> dict[str, Any]:
    """Latency (warm median of the meter's repeats, batch 1) and quality on the meter's held-out seeds."""
    measured = meter.latency(candidate)
    meter.quality(candidate, measured)
    return {"latency_ms": measured.latency_ms, "nfe": measured.nfe, **measured.metrics}


def baseline_steps_within(meter: ShapesMeter, model: str, budget: float, cache: dict[int, float]) -> int | None:
    """The largest DPM-Solver++ step count whose measured latency fits (latency grows with steps: bisect)."""
    def fits(steps: int) -> bool:
        if steps not in cache:
            cache[steps] = meter.latency(Candidate(model, BASELINE, steps)).latency_ms
        return cache[steps] <= budget

    lo, hi = 0, len(BASELINE_STEPS)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(BASELINE_STEPS[mid]):
            lo = mid + 1
        else:
            hi = mid
    return BASELINE_STEPS[lo - 1] if lo else None


def shapes_study(profile: ParetoProfile, plot_dir: Path | None) -> dict[str, Any]:
    registry = ModelRegistry.default()
    # latency on the engine the profile was measured with (compiled: every timed shape's graphs built first),
    # quality eagerly, as the sweep measures it
    engine = Engine(registry, acceleration=profile.engine_acceleration, buckets=profile.compile_buckets)
    # held-out seeds (image k: seed 10_000 + k), batch 1 only, 7 repeats; the sweep measured on seeds 0 + k
    meter = ShapesMeter(engine, profile.model, seed=HELD_OUT_SEED, batch_size=1, repeats=7,
                        quality_engine=Engine(registry))
    served = [m for m in {p.model for p in profile.points} if m in registry.ids()]
    cache: dict[int, float] = {}
    rows = []
    for budget in BUDGETS_MS:
        row: dict[str, Any] = {"budget_ms": budget}
        try:
            point = profile.points[choose_point(profile, budget, models=served)]
        except Exception as exc:
            row["auto"] = {"error": str(exc)}
            point = None
        if point is not None:
            row["auto"] = {"model": point.model, "strategy": point.strategy, "steps": point.steps,
                           "profile_latency_ms": point.latency_ms, "profile_quality": point.quality,
                           **measure(meter, Candidate(point.model, point.strategy, point.steps))}
        steps = baseline_steps_within(meter, profile.model, budget, cache)
        if steps is None:
            row["baseline"] = {"error": "no step count fits", "latency_ms_at_1_step": cache.get(1)}
        else:
            row["baseline"] = {"steps": steps, **measure(meter, Candidate(profile.model, BASELINE, steps))}
        auto_q, base_q = row["auto"].get("prompt_accuracy"), row["baseline"].get("prompt_accuracy", 0.0)
        row["auto_strictly_better"] = auto_q is not None and auto_q > base_q
        rows.append(row)
        print(json.dumps(row), flush=True)
    if plot_dir is not None:
        spec = registry.spec(profile.model)
        plot_profile(profile, plot_dir / f"pareto_{profile.model}.png",
                     spec.default_strategy.model_dump(exclude_none=True), spec.default_steps)
    at_20 = rows[0]["auto"].get("prompt_accuracy")
    return {"profile": profile.file_name, "profile_date": profile.date, "points": len(profile.points),
            "engine_acceleration": profile.engine_acceleration,
            "front": len(profile.front), "held_out_seed": HELD_OUT_SEED, "rows": rows,
            "targets": {"strictly_better_at_every_budget": all(r["auto_strictly_better"] for r in rows),
                        "accuracy_at_20ms": at_20, "accuracy_at_20ms_ge_0.85": at_20 is not None and at_20 >= 0.85}}


def gmm_study(samplers_json: Path, plot_dir: Path | None) -> dict[str, Any]:
    """The front of endpoint error vs NFE over the samplers benchmark's gmm rows."""
    data = json.loads(samplers_json.read_text())["gmm"]
    points, labels = [], []
    for row in data["rows"]:
        for nfe, error in row["mean_endpoint_error"].items():
            points.append((float(nfe), -float(error)))
            labels.append(f"{row['sampler']} ({row['grid']})")
    front = pareto_front(points)
    table = [{"nfe": int(points[i][0]), "sampler": labels[i], "mean_endpoint_error": -points[i][1]} for i in front]
    if plot_dir is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
        ax.scatter([p[0] for p in points], [-p[1] for p in points], s=10, c="#9aa5b1", label="samplers x NFE")
        ax.step([r["nfe"] for r in table], [r["mean_endpoint_error"] for r in table], where="post", c="#d1495b",
                label="front (best sampler per NFE)")
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel("mean endpoint error vs the exact ODE (gmm)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(plot_dir / "pareto_gmm.png")
        plt.close(fig)
    return {"source": str(samplers_json), "front": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", type=Path, default=None, help="the shapes profile (needed for the shapes part)")
    parser.add_argument("--parts", default="gmm,shapes", help="comma-separated: gmm, shapes")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pareto_cpu.json"))
    parser.add_argument("--plot-dir", type=Path, default=None)
    parser.add_argument("--samplers-json", type=Path, default=Path("benchmarks/results/samplers_cpu.json"))
    args = parser.parse_args()
    if args.plot_dir:
        args.plot_dir.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    if "shapes" in parts and args.profile is None:
        parser.error("the shapes part needs --profile (written by accel-diffusion bench pareto)")
    result: dict[str, Any] = {"benchmark": "pareto", "machine": machine()}
    if "gmm" in parts:
        result["gmm"] = gmm_study(args.samplers_json, args.plot_dir)
    if "shapes" in parts:
        result["shapes"] = shapes_study(ParetoProfile.load(args.profile), args.plot_dir)
        print(json.dumps(result["shapes"]["targets"], indent=1))
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
