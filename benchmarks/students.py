"""One-step students benchmark: f-distill, DisBack, SlimFlow on the gmm oracle and on `shapes` (issue #17).

    python benchmarks/students.py --out benchmarks/results/students_cpu.json [--parts gmm,shapes]

1. gmm: each method distilled by its recipe at the same budget (``--gmm-iterations``, seed 0): 1-step MMD² to
   the mixture, mode weights and their max error, and generator steps to a target MMD (the first evaluation of
   the run's history at or under ``--mmd-target``; the history is evaluated every budget/5 iterations).
2. shapes: the teacher at 25 steps CFG 5 (50 NFE), the best few-step sampler of the samplers benchmark (GHVB 0.8
   on a Karras ρ = 3 grid, 4 steps, CFG 5) and every shipped student at 1 NFE, in this one run: prompt accuracy
   over the 196 prompts (the project's judge), out-of-gamut % (channel values < 10 or > 250), FD-shapes to the
   teacher's own 25-step samples and to real renders, images/s at batch 1 and 16 (decode included), UNet
   parameters and training wall time (from the student's training_info.json). A student that is not in the
   registry gets a row saying "not trained yet".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine import machine

from accel_diffusion.engine import Engine
from accel_diffusion.eval.frechet import frechet_distance
from accel_diffusion.eval.shapes_eval import JudgeFeatures, real_renders, shapes_prompts
from accel_diffusion.eval.shapes_judge import ShapesJudge
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.strategy import GenerationRequest
from accel_diffusion.students.distill import METHODS, distill

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ("teacher: DPM-Solver++ 2M, 25 steps, CFG 5", "shapes", None, 25, "full")
FEW_STEP = ("GHVB 0.8 (Karras ρ 3), 4 steps, CFG 5", "shapes",
            {"sampler": {"name": "ghvb", "order": 0.8}, "schedule": {"name": "karras", "rho": 3.0}}, 4, "full")

STUDENTS = {"fdistill": "shapes_fdistill", "disback": "shapes_disback", "slimflow": "shapes_slimflow"}


def gmm_part(iterations: int, mmd_target: float) -> dict[str, Any]:
    rows = {}
    for method in METHODS:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            info = distill(method, "gmm", Path(tmp) / f"gmm_{method}", iterations=iterations, seed=0, progress=False)
            card = json.loads((Path(tmp) / f"gmm_{method}" / "training_info.json").read_text())
        history = card["recipe"]["history"]
        reached = next((h["iteration"] for h in history if h["mmd"] <= mmd_target), None)
        rows[method] = {**info["quality"], "steps_to_target": reached, "history": history,
                        "wall_seconds": round(time.perf_counter() - started, 2)}
        print(method, {k: v for k, v in rows[method].items() if k != "history"}, flush=True)
    return {"iterations": iterations, "mmd_target": mmd_target, "methods": rows}


def _generate_all(engine: Engine, model: str, strategy: dict | None, steps: int | None,
                  vae: str = "full") -> tuple[np.ndarray, Any]:
    prompts = shapes_prompts()
    images, result = [], None
    for start in range(0, len(prompts), 49):
        request = GenerationRequest.create(model=model, prompt=prompts[start:start + 49], seed=start, steps=steps,
                                           strategy=strategy or {}, vae=vae)
        result = engine.generate(request)
        images.append(result.to_uint8())
    return np.concatenate(images), result


def _images_per_second(engine: Engine, model: str, strategy: dict | None, steps: int | None, batch: int,
                       repeats: int, vae: str = "full") -> float:
    prompts = shapes_prompts()[:batch]
    request = GenerationRequest.create(model=model, prompt=prompts, seed=0, steps=steps, strategy=strategy or {},
                                       vae=vae)
    engine.generate(request)  # warm-up
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        engine.generate(request)
        times.append(time.perf_counter() - begin)
    return batch / statistics.median(times)


def _warm_batch1(loaded: Any, strategy_has_cfg: bool, vae: str) -> float:
    """Build (now, before any timing) the compiled graphs a batch-1 request of this row runs: the UNet at its
    rows (2 with CFG) and the decode of the autoencoder it asks for; their seconds."""
    from accel_diffusion.engine.compiled import warm

    vae_module = loaded.tiny_vae if vae == "tiny" else loaded.pipeline.vae
    graphs = warm(loaded, unet_rows=[2 if strategy_has_cfg else 1], decode_rows=[1], vaes=[vae_module])
    return round(sum(g["seconds"] for g in graphs), 1)


def shapes_part(repeats: int, acceleration: str = "none") -> dict[str, Any]:
    registry = ModelRegistry.default()
    engine = Engine(registry, acceleration=acceleration)
    judge = ShapesJudge.load()
    features = JudgeFeatures(judge)
    real = real_renders()
    prompts = shapes_prompts()
    rows: dict[str, Any] = {}
    teacher_images = None
    entries = [TEACHER, FEW_STEP] + [(f"{method} student, 1 step", model, None, None, "full")
                                     for method, model in STUDENTS.items()]
    for label, model, strategy, steps, vae in entries:
        if model not in registry.ids():
            rows[label] = {"model": model, "status": "not trained yet"}
            print(label, rows[label], flush=True)
            continue
        images, result = _generate_all(engine, model, strategy, steps, vae)
        if teacher_images is None:
            teacher_images = images
        loaded = registry.get(model)
        accuracy = judge.prompt_accuracy(images, prompts)
        row: dict[str, Any] = {
            "model": model, "strategy": result.strategy.model_dump(exclude_none=True), "steps": result.steps,
            "nfe": result.nfe, "prompt_accuracy": accuracy,
            "out_of_gamut_percent": round(100 * float(((images < 10) | (images > 250)).mean()), 3),
            "fd_to_teacher": frechet_distance(teacher_images, images, features),
            "fd_to_real": frechet_distance(real, images, features),
            "vae": vae,
            "engine_acceleration": acceleration,
            "unet_parameters": sum(p.numel() for p in loaded.pipeline.unet.parameters()),
        }
        if acceleration == "compile":  # batch 1 only: every graph is built before its row is timed
            row["compile_seconds"] = _warm_batch1(loaded, result.strategy.guidance["name"] != "none", vae)
        row["images_per_second_batch1"] = _images_per_second(engine, model, strategy, steps, 1, repeats, vae)
        if acceleration == "none":
            row["images_per_second_batch16"] = _images_per_second(engine, model, strategy, steps, 16,
                                                                  max(repeats // 3, 2), vae)
        card = _training_info(model)
        if card is not None:
            row["training_wall_seconds"] = card.get("wall_seconds")
            row["training_command"] = card.get("command")
        rows[label] = row
        print(label, {k: v for k, v in row.items() if k != "strategy"}, flush=True)
    teacher_rate = rows[TEACHER[0]]["images_per_second_batch1"]
    for row in rows.values():
        if "images_per_second_batch1" in row:
            row["speedup_batch1_vs_teacher"] = round(row["images_per_second_batch1"] / teacher_rate, 2)
    return {"rows": rows}


def _training_info(model: str) -> dict[str, Any] | None:
    path = ROOT / "accel_diffusion" / "models" / "builtin" / model / "training_info.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/students_cpu.json")
    parser.add_argument("--parts", default="gmm,shapes")
    parser.add_argument("--gmm-iterations", type=int, default=1500)
    parser.add_argument("--mmd-target", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=9, help="timed runs at batch 1 (a third at batch 16)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--engine-acceleration", choices=["none", "compile"], default="none",
                        help="shapes part: the engine's acceleration for the timed rows (compile: batch 1 only, each "
                             "row's graphs built before it is timed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    started = time.perf_counter()
    report: dict[str, Any] = {"machine": machine()}
    parts = set(args.parts.split(","))
    if "gmm" in parts:
        report["gmm"] = gmm_part(args.gmm_iterations, args.mmd_target)
    if "shapes" in parts:
        report["shapes"] = shapes_part(args.repeats, args.engine_acceleration)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    report["load_average_start_end"] = [list(load_start), list(os.getloadavg())]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
