"""Which search fitness agrees with held-out prompt accuracy? (AutoDiffusion on `shapes`, issue #18.)

    nice -n 10 python benchmarks/search_fitness.py --out benchmarks/results/search_fitness_cpu.json

For each sampler (CFG 5, K steps) a population of candidate timestep sequences (the uniform one, the
hand-made grids, mutations of both, random ones: the kinds a search meets) is scored with every
fitness kind on the *search* prompts and seeds (what a search sees), and with prompt accuracy on the
*held-out* prompts and seeds (what we want; eval/schedule_fitness.py documents the split). The
Spearman rank correlation of each kind with held-out accuracy (fitness negated: lower is better)
says which kind a search should minimise; the best-agreeing kind is the search's default.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from engine import machine

from accel_diffusion.engine import Engine
from accel_diffusion.eval.schedule_fitness import (
    FITNESS_KINDS,
    HELD_OUT_SEED,
    ShapesScheduleFitness,
    held_out_prompts,
)
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.schedules.autodiffusion import SearchSpace, mutate, random_candidate
from accel_diffusion.schedules.search_command import hand_made_grids, resolve_components

SAMPLERS = {"dpmpp_2m": {"name": "dpmpp_2m"}, "ghvb_0.8": {"name": "ghvb", "order": 0.8}}


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):
        tied = values == v
        out[tied] = out[tied].mean()
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1])


def population(space: SearchSpace, grids: list[tuple[int, ...]], size: int, seed: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    found = list(dict.fromkeys([space.uniform(), *grids]))
    parents = list(found)
    while len(found) < size:
        draw = rng.random()
        candidate = (random_candidate(rng, space) if draw < 0.25
                     else mutate(rng.choice(parents), rng, space, 0.25 if draw < 0.6 else 0.5, 20 if draw < 0.8 else 0))
        if candidate not in found:
            found.append(candidate)
    return found


def measure(engine: Engine, name: str, steps: int, size: int, images: int, seed: int) -> dict[str, Any]:
    spec = engine.models.get("shapes")
    sampler, guidance = resolve_components(spec.spec, SAMPLERS[name], {"name": "cfg", "scale": 5.0})
    space = SearchSpace(steps, int(spec.scheduler_config["num_train_timesteps"]))
    candidates = population(space, hand_made_grids(dict(spec.scheduler_config), sampler, space), size, seed)
    search = ShapesScheduleFitness(engine, sampler=sampler, guidance=guidance, images=images, seed=seed)
    held = ShapesScheduleFitness(engine, sampler=sampler, guidance=guidance, prompts=held_out_prompts(),
                                 seed=HELD_OUT_SEED, judge=search.judge)
    rows = []
    begin = time.perf_counter()
    for i, candidate in enumerate(candidates):
        scores = search.scores(candidate)
        accuracy = held.judge.prompt_accuracy(held.candidate_images(candidate), held.prompts)["all"]
        rows.append({"timesteps": list(candidate), "search": scores, "held_out_accuracy": accuracy})
        print(f"{name} {i + 1}/{len(candidates)} {candidate} held-out acc {accuracy:.3f} "
              f"pd {scores['paired_distance']:.4f} fd {scores['teacher_fd']:.1f} acc {scores['prompt_accuracy']:.3f}",
              flush=True)
    held_acc = [r["held_out_accuracy"] for r in rows]
    agreement = {}
    for kind in FITNESS_KINDS:
        fitness = [1.0 - r["search"]["prompt_accuracy"] if kind == "prompt_accuracy" else r["search"][kind]
                   for r in rows]
        agreement[kind] = spearman([-f for f in fitness], held_acc)
    return {"sampler": sampler, "guidance": guidance, "steps": steps, "candidates": len(rows),
            "search_images": images, "held_out_images": len(held.prompts), "spearman_with_held_out_accuracy":
            agreement, "wall_s": time.perf_counter() - begin, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=40)
    parser.add_argument("--images", type=int, default=49, help="search prompts per candidate (the search's --images)")
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/search_fitness_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine = Engine(ModelRegistry.default())
    load = os.getloadavg()
    runs = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.samplers:  # the report is written after each sampler: a run stopped midway keeps those
        runs.append(measure(engine, name, args.steps, args.candidates, args.images, args.seed))
        report = {"machine": machine(), "load_avg_start": load, "load_avg_end": os.getloadavg(), "runs": runs}
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    for run in runs:
        print(run["sampler"]["name"], {k: round(v, 3) for k, v in run["spearman_with_held_out_accuracy"].items()})


if __name__ == "__main__":
    main()
