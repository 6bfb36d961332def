"""AutoDiffusion on `shapes`: searched schedules vs the uniform one vs the best hand-made grid (issue #18).

    nice -n 10 python benchmarks/search.py --out benchmarks/results/search_cpu.json

For every searched artifact named (default: the ones shipped for `shapes`), with its sampler, guidance
and step count, in the same run: the uniform K-step schedule, every hand-made grid the sampler builds
at K steps (the best of them on held-out accuracy is reported as "best grid"), and the searched
timesteps, all on the *held-out* prompts and seeds (eval/schedule_fitness.py: never searched on):
prompt accuracy, out-of-gamut %, the paired distance to the teacher (the same sampler and guidance
at 50 steps from the same noise; one teacher per sampler), and the artifact's search wall time. An
artifact with skipped blocks gives the stage-2 row instead: its timesteps with and without the skips,
the UNet time measured around every UNet call (each timed twice, alternately, the faster kept), and
the accuracy lost.
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
from accel_diffusion.eval.schedule_fitness import HELD_OUT_SEED, ShapesScheduleFitness, held_out_prompts
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.schedules.autodiffusion import SearchSpace
from accel_diffusion.schedules.search_command import hand_made_grids
from accel_diffusion.schedules.searched import find_artifact, list_artifacts

TEACHER_STEPS = 50


class UnetTimer:
    """Wall time spent inside the UNet's forward (hooks around the module), summed."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet, self.seconds, self._start = unet, 0.0, 0.0

    def __enter__(self) -> UnetTimer:
        self._handles = [self.unet.register_forward_pre_hook(self._before),
                         self.unet.register_forward_hook(self._after)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _before(self, *args: object) -> None:
        self._start = time.perf_counter()

    def _after(self, *args: object) -> None:
        self.seconds += time.perf_counter() - self._start


def row(fitness: ShapesScheduleFitness, timesteps: list[int], skipped: list[list[str]] | None = None,
        mode: str | dict[str, str] = "drop") -> dict[str, Any]:
    unet = fitness.engine.models.get(fitness.model).pipeline.unet
    with UnetTimer(unet) as timer:
        images = (fitness.plan_images(timesteps, skipped, mode) if skipped is not None  # type: ignore[arg-type]
                  else fitness.candidate_images(timesteps))
    scores = fitness.measure(images)
    return {"timesteps": timesteps, "prompt_accuracy": scores["prompt_accuracy"],
            "out_of_gamut_pct": 100.0 * scores["out_of_gamut"], "paired_distance": scores["paired_distance"],
            "teacher_fd": scores["teacher_fd"], "unet_s": timer.seconds}


def compare(engine: Engine, schedule_id: str, teachers: dict[str, Any], images: int = 98,
            teacher_steps: int = TEACHER_STEPS) -> dict[str, Any]:
    artifact = find_artifact(schedule_id)
    loaded = engine.models.get(artifact.model)
    space = SearchSpace(artifact.steps, int(loaded.scheduler_config["num_train_timesteps"]))
    fitness = ShapesScheduleFitness(engine, sampler=artifact.sampler, guidance=artifact.guidance, model=artifact.model,
                                    prompts=held_out_prompts()[:images], seed=HELD_OUT_SEED,
                                    teacher_steps=teacher_steps)
    key = json.dumps([artifact.model, artifact.sampler, artifact.guidance])  # one teacher per sampler and guidance
    fitness._teacher = teachers.get(key)
    teachers[key] = fitness.teacher()
    result: dict[str, Any] = {
        "id": artifact.id, "sampler": artifact.sampler, "guidance": artifact.guidance, "steps": artifact.steps,
        "fitness": artifact.fitness.model_dump(), "search_wall_s": artifact.search.wall_time_s,
        "search_evaluations": artifact.search.evaluations, "command": artifact.search.command,
        "held_out_images": len(fitness.prompts), "searched": row(fitness, list(artifact.timesteps))}
    if not any(artifact.skipped_blocks):
        uniform = row(fitness, list(space.uniform()))
        grids = {str(list(g)): row(fitness, list(g)) for g in hand_made_grids(dict(loaded.scheduler_config),
                                                                             artifact.sampler, space)}
        result |= {"uniform": uniform, "best_grid": max(grids.values(), key=lambda r: (r["prompt_accuracy"],
                                                                                        -r["paired_distance"])),
                   "grids": grids,
                   "paired_distance_vs_uniform": result["searched"]["paired_distance"] / uniform["paired_distance"]}
        return result
    # stage 2: the same timesteps with and without the skips, timed alternately twice (the faster of each kept)
    mode = artifact.modes()
    plain, skipping = result["searched"], row(fitness, list(artifact.timesteps), artifact.skipped_blocks, mode)
    plain_s = min(plain["unet_s"], row(fitness, list(artifact.timesteps))["unet_s"])
    skip_s = min(skipping["unet_s"], row(fitness, list(artifact.timesteps), artifact.skipped_blocks, mode)["unet_s"])
    result["stage2"] = {"skipped_blocks": artifact.skipped_blocks, "skip_mode": mode,
                        "modelled_unet_cost": artifact.search.unet_cost,
                        "skip_budget": artifact.search.skip_budget, "with_skips": skipping,
                        "unet_s_without": plain_s, "unet_s_with": skip_s,
                        "unet_time_saved_pct": 100.0 * (1.0 - skip_s / plain_s),
                        "accuracy_lost_points": 100.0 * (plain["prompt_accuracy"] - skipping["prompt_accuracy"])}
    return result


def markdown(report: dict[str, Any]) -> str:
    """The docs/benchmarks.md tables of a report."""
    lines = ["| schedule | sampler | K | timesteps | prompt accuracy | out-of-gamut % | paired distance | search |",
             "|---|---|---|---|---|---|---|---|"]
    stage2 = []
    for r in report["runs"]:
        sampler = r["sampler"]["name"] + (f" {r['sampler']['order']}" if r["sampler"]["name"] == "ghvb" else "")
        if "stage2" in r:
            stage2.append(r)
            continue
        for label, x in (("uniform", r["uniform"]), ("best hand-made grid", r["best_grid"]),
                         (f"**searched** `{r['id']}`", r["searched"])):
            search = (f"{r['search_wall_s'] / 60:.1f} min, {r['search_evaluations']} candidates"
                      if label.startswith("**") else "")
            lines.append(f"| {label} | {sampler} | {r['steps']} | {x['timesteps']} | {x['prompt_accuracy']:.3f} | "
                         f"{x['out_of_gamut_pct']:.1f} | {x['paired_distance']:.4f} | {search} |")
        lines.append(f"| searched / uniform paired distance | | | | | | x{r['paired_distance_vs_uniform']:.2f} | |")
    if stage2:
        lines += ["", "| stage 2 | skipped blocks per step | modelled UNet cost | UNet time saved (measured) | "
                  "accuracy without / with skips | search |", "|---|---|---|---|---|---|"]
        for r in stage2:
            s2 = r["stage2"]
            mode = s2.get("skip_mode", "drop")
            mode = mode if isinstance(mode, str) else "per block: " + ", ".join(f"{b} {m}" for b, m in mode.items())
            lines.append(f"| `{r['id']}` ({mode}) | {s2['skipped_blocks']} | "
                         f"x{s2['modelled_unet_cost']:.3f} | "
                         f"{s2['unet_time_saved_pct']:.1f}% | {r['searched']['prompt_accuracy']:.3f} / "
                         f"{s2['with_skips']['prompt_accuracy']:.3f} | {r['search_wall_s'] / 60:.1f} min |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ids", nargs="*", default=None, help="searched schedules (default: every one for shapes)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/search_cpu.json"))
    parser.add_argument("--images", type=int, default=98, help="held-out prompts used (all 98 for the record)")
    parser.add_argument("--teacher-steps", type=int, default=TEACHER_STEPS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine = Engine(ModelRegistry.default())
    ids = args.ids if args.ids else [a.id for a in list_artifacts() if a.model == "shapes"]
    load = os.getloadavg()
    runs: list[dict[str, Any]] = []
    teachers: dict[str, Any] = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for schedule_id in ids:  # the report is rewritten after each artifact
        r = compare(engine, schedule_id, teachers, args.images, args.teacher_steps)
        runs.append(r)
        if "stage2" in r:
            print(f"{schedule_id}: stage 2: UNet time -{r['stage2']['unet_time_saved_pct']:.1f}%, accuracy lost "
                  f"{r['stage2']['accuracy_lost_points']:+.1f} points", flush=True)
        else:
            print(f"{schedule_id}: searched acc {r['searched']['prompt_accuracy']:.3f} (uniform "
                  f"{r['uniform']['prompt_accuracy']:.3f}, best grid {r['best_grid']['prompt_accuracy']:.3f}); "
                  f"paired distance x{r['paired_distance_vs_uniform']:.2f} of uniform", flush=True)
        report = {"machine": machine(), "load_avg_start": load, "load_avg_end": os.getloadavg(),
                  "teacher_steps": args.teacher_steps, "runs": runs}
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
