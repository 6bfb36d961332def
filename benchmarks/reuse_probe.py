"""Which `shapes` UNet blocks may be reused (DeepCache-style) or dropped at the searched timesteps (issue #18 stage 2).

    nice -n 10 python benchmarks/reuse_probe.py --out benchmarks/results/reuse_probe_cpu.json

For a searched artifact's timesteps (default: the shipped GHVB 0.8 4-step one), on the search prompts only
(the held-out ones stay unseen): the prompt accuracy with each skippable block skipped at every step but the
first, in each skip mode (reuse, residual, drop), and with DeepCache's set (every block of the deep branch:
all but down_blocks.0 and the last up block) reused at every step but the first and at every other step;
beside each, the block's measured share of a UNet call (the cost model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from engine import machine

from accel_diffusion.engine import Engine
from accel_diffusion.eval.schedule_fitness import ShapesScheduleFitness
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.schedules.search_command import block_cost_model
from accel_diffusion.schedules.searched import find_artifact

MODES = ("reuse", "residual", "drop")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--id", default="shapes-ghvb0.8-cfg5-4", help="the searched artifact whose timesteps are used")
    parser.add_argument("--images", type=int, default=49, help="search prompts scored (fixed seeds)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/reuse_probe_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    artifact = find_artifact(args.id)
    engine = Engine(ModelRegistry.default())
    fitness = ShapesScheduleFitness(engine, sampler=artifact.sampler, guidance=artifact.guidance, model=artifact.model,
                                    images=args.images, seed=artifact.seed)
    timesteps, K = list(artifact.timesteps), artifact.steps
    blocks, shares = block_cost_model(engine, artifact.model, fitness)
    load, start = os.getloadavg(), time.perf_counter()

    def accuracy(skipped: list[list[str]], mode: str) -> float:
        return 1.0 - fitness.fitness_of(fitness.plan_images(timesteps, skipped, mode))  # type: ignore[arg-type]

    rows: list[dict[str, Any]] = []
    plain = accuracy([[] for _ in timesteps], "drop")
    print(f"{args.id} {timesteps}: accuracy {plain:.3f} on {args.images} search prompts", flush=True)
    for block in blocks:
        plan = [[]] + [[block] for _ in range(K - 1)]
        row = {"block": block, "share": shares[block], **{mode: accuracy(plan, mode) for mode in MODES}}
        rows.append(row)
        print(f"{block:30s} share {row['share']:.3f}  " + "  ".join(f"{m} {row[m]:.3f}" for m in MODES), flush=True)
    last_up = max(int(b.split(".")[1]) for b in blocks if b.startswith("up_blocks."))
    deep = [b for b in blocks if not b.startswith(("down_blocks.0.", f"up_blocks.{last_up}."))]
    deep_share = sum(shares[b] for b in deep)
    deepcache: dict[str, Any] = {"blocks": deep, "share": deep_share}
    for mode in ("reuse", "residual"):
        deepcache[mode] = {"every_step_but_first": accuracy([[]] + [deep for _ in range(K - 1)], mode),
                           "every_other_step": accuracy([deep if k % 2 else [] for k in range(K)], mode)}
        print(f"DeepCache set (share {deep_share:.3f}), {mode}: every step but the first "
              f"{deepcache[mode]['every_step_but_first']:.3f}, every other step "
              f"{deepcache[mode]['every_other_step']:.3f}", flush=True)
    report = {"machine": machine(), "load_avg_start": load, "load_avg_end": os.getloadavg(),
              "wall_s": time.perf_counter() - start, "id": args.id, "timesteps": timesteps,
              "search_images": args.images, "accuracy_plain": plain, "overhead_share": shares[""], "blocks": rows,
              "deepcache": deepcache}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
