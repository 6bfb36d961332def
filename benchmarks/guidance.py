"""Guidance benchmark on the built-in `shapes` model: CFG vs APG across scales, RCFG vs CFG, APG's cost.

    python benchmarks/guidance.py --out benchmarks/results/guidance_cpu.json --grid docs/images/guidance_grid.png

1. Scale sweep (25 DPM-Solver++ steps, the 196 shape x colour x background prompts, seed i for prompt
   i): prompt accuracy, pixels < 10 or > 250, mean HSV saturation, FD-shapes, for CFG and APG (its
   defaults: x0 space, eta 0, momentum -0.5, RMS threshold 0.01) at scales 3, 5, 7.5, 10, 15, 20.
2. A picture grid of 4 prompts, CFG vs APG at scales 5, 10, 20.
3. RCFG vs CFG at 4 and 25 steps: img2img from one render (strength 0.8 of 5 steps, 25/32 of 32) towards every
   prompt, for
   CFG (scale 5), RCFG self-negative and onetime-negative (scales 5 and 1.2): images/s, NFE, accuracy.
4. APG's cost: whole generations (batch 49, 25 steps) APG vs CFG, interleaved; and the combine alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from engine import machine

from accel_diffusion.engine import Engine
from accel_diffusion.engine.step import StepContext
from accel_diffusion.eval.shapes_eval import evaluate_shapes, real_renders, shapes_prompts
from accel_diffusion.eval.shapes_judge import ShapesJudge
from accel_diffusion.guidance.apg import ApgGuidance
from accel_diffusion.guidance.cfg import CfgGuidance
from accel_diffusion.models.shapes.render import ShapeSpec, render
from accel_diffusion.strategy import GenerationRequest

SCALES = (3.0, 5.0, 7.5, 10.0, 15.0, 20.0)
GRID_PROMPTS = ("a red circle on a blue background", "a yellow triangle on a black background",
                "a white cross on a green background", "a purple square on an orange background")


def scale_sweep(engine: Engine, judge: ShapesJudge, real: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    configs = [(name, scale) for scale in SCALES for name in ("cfg", "apg")]
    for name, scale in tqdm(configs, desc="scale sweep"):
        m = evaluate_shapes(engine, strategy={"guidance": {"name": name, "scale": scale}}, steps=25, judge=judge,
                            real=real, progress=False)
        rows.append({"guidance": name, "scale": scale, "accuracy": m["prompt_accuracy"]["all"],
                     "clipped_fraction": m["saturation"]["clipped_fraction"],
                     "mean_saturation": m["saturation"]["mean_saturation"], "frechet_distance": m["frechet_distance"],
                     "seconds_per_image": m["seconds_per_image"], "strategy": m["strategy"]})
    return rows


def picture_grid(engine: Engine, path: Path) -> None:
    """Rows: prompts; columns: CFG 5, 10, 20 | APG 5, 10, 20 (same seeds), 4x upscaled, labelled."""
    cell, label = 128, 18
    columns = [(name, scale) for name in ("cfg", "apg") for scale in (5.0, 10.0, 20.0)]
    grid = Image.new("RGB", (cell * len(columns), label + cell * len(GRID_PROMPTS)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (name, scale) in enumerate(columns):
        draw.text((c * cell + 4, 3), f"{name.upper()} {scale:g}", fill="black")
        result = engine.generate(GenerationRequest.create(
            prompt=list(GRID_PROMPTS), seed=7, steps=25, strategy={"guidance": {"name": name, "scale": scale}}))
        for r, image in enumerate(result.to_pil()):
            grid.paste(image.resize((cell, cell), Image.NEAREST), (c * cell, label + r * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, optimize=True)


RCFG_INIT = ShapeSpec("circle", "white", "black", None, 9, 16, 16)
# denoising steps run -> (scheduled steps, strength) with int(scheduled x strength) = steps exactly
RCFG_STEPS = {4: (5, 0.8), 25: (32, 0.78125)}
RCFG_CONFIGS = [(steps, g) for steps in RCFG_STEPS for g in (
    {"name": "cfg", "scale": 5.0},
    *({"name": "rcfg", "variant": variant, "scale": scale} for scale in (5.0, 1.2) for variant in ("self", "onetime")),
)]


def rcfg_vs_cfg_tiny_vae(engine: Engine, repeats: int) -> list[dict[str, Any]]:
    """The paired speed-ups again with the model's tiny autoencoder at both ends, for CFG and RCFG alike."""
    init = Image.fromarray(render(RCFG_INIT))
    speedups = paired_speedups(engine, init, RCFG_CONFIGS, repeats, vae="tiny")
    return [{"guidance": g, "steps": steps, "speedup_vs_cfg": speedup}
            for (steps, g), speedup in zip(RCFG_CONFIGS, speedups, strict=True)]


def rcfg_vs_cfg(engine: Engine, judge: ShapesJudge, real: np.ndarray, repeats: int) -> list[dict[str, Any]]:
    init = Image.fromarray(render(RCFG_INIT))
    rows = []
    configs = RCFG_CONFIGS
    for steps, guidance in tqdm(configs, desc="rcfg vs cfg"):
        scheduled, strength = RCFG_STEPS[steps]
        m = evaluate_shapes(engine, strategy={"guidance": guidance}, steps=scheduled, judge=judge, real=real,
                            progress=False, init_image=init, strength=strength)
        assert m["steps"] == steps, m["steps"]
        rows.append({"guidance": guidance, "steps": m["steps"], "nfe_per_image": m["nfe_per_image"],
                     "images_per_s": 1.0 / m["seconds_per_image"], "accuracy": m["prompt_accuracy"]["all"],
                     "clipped_fraction": m["saturation"]["clipped_fraction"],
                     "frechet_distance": m["frechet_distance"]})
    speedups = paired_speedups(engine, init, configs, repeats)
    for row, speedup in zip(rows, speedups):
        row["speedup_vs_cfg"] = speedup
    return rows


def paired_speedups(engine: Engine, init: Image.Image, configs: list[tuple[int, dict]], repeats: int,
                    vae: str = "full") -> list[float]:
    """Images/s relative to CFG at the same steps: batches of 49, each configuration timed back to back
    with its CFG twin `repeats` times; the median of the pair ratios (robust to the machine's drift)."""
    prompts = shapes_prompts()[:49]

    def request(steps: int, guidance: dict) -> GenerationRequest:
        scheduled, strength = RCFG_STEPS[steps]
        return GenerationRequest.create(prompt=prompts, seed=0, steps=scheduled, init_image=init,
                                        strength=strength, strategy={"guidance": guidance}, vae=vae)

    def timed(req: GenerationRequest) -> float:
        start = time.perf_counter()
        engine.generate(req)
        return time.perf_counter() - start

    speedups = []
    for steps, guidance in configs:
        ours, cfg = request(steps, guidance), request(steps, {"name": "cfg", "scale": 5.0})
        timed(ours), timed(cfg)  # warm-up
        speedups.append(statistics.median(timed(cfg) / timed(ours) for _ in range(repeats)))
    return speedups


def apg_cost(engine: Engine, repeats: int) -> dict[str, Any]:
    prompts = shapes_prompts()[:49]
    requests = {name: GenerationRequest.create(prompt=prompts, seed=0, steps=25,
                                               strategy={"guidance": {"name": name, "scale": 7.5}})
                for name in ("cfg", "apg")}
    times: dict[str, list[float]] = {"cfg": [], "apg": []}
    for name in ("cfg", "apg"):
        engine.generate(requests[name])
    for _ in range(repeats):
        for name in ("cfg", "apg"):
            start = time.perf_counter()
            engine.generate(requests[name])
            times[name].append(time.perf_counter() - start)
    ratio = statistics.median(a / c for a, c in zip(times["apg"], times["cfg"]))
    # the combine alone, on a step's worth of shapes latents (49 images, 4x8x8)
    model = engine.models.get("shapes")
    scheduler = get_scheduler(model)
    x = torch.randn(49, 4, 8, 8)
    step = StepContext(0, 25, torch.tensor(601), x, x, scheduler, "epsilon")
    preds = {"cond": torch.randn_like(x), "uncond": torch.randn_like(x)}
    combine_us = {}
    for name, guidance in (("cfg", CfgGuidance(scale=7.5)), ("apg", ApgGuidance(scale=7.5))):
        guidance.begin(None)
        start = time.perf_counter()
        for _ in range(2000):
            guidance.combine(preds, step)
        combine_us[name] = (time.perf_counter() - start) / 2000 * 1e6
    return {"generation_time_ratio_apg_over_cfg": ratio, "cfg_s": statistics.median(times["cfg"]),
            "apg_s": statistics.median(times["apg"]), "combine_us": combine_us, "repeats": repeats}


def get_scheduler(model: Any) -> Any:
    from accel_diffusion.registry import get_registry

    scheduler = get_registry().build("sampler", "dpmpp_2m").make_scheduler(model.scheduler_config, {})
    scheduler.set_timesteps(25)
    return scheduler


def markdown(result: dict[str, Any]) -> str:
    lines = ["Scale sweep (25 DPM-Solver++ steps, 196 prompts; real renders: accuracy 1.000, 0% clipped, "
             "saturation 0.618):", "",
             "| scale | CFG accuracy | APG accuracy | CFG clipped | APG clipped | CFG saturation | APG saturation "
             "| CFG FD | APG FD |", "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["guidance"], r["scale"]): r for r in result["scale_sweep"]}
    for scale in SCALES:
        c, a = by[("cfg", scale)], by[("apg", scale)]
        lines.append(f"| {scale:g} | {c['accuracy']:.3f} | **{a['accuracy']:.3f}** | {c['clipped_fraction']:.4f} "
                     f"| **{a['clipped_fraction']:.4f}** | {c['mean_saturation']:.3f} | {a['mean_saturation']:.3f} "
                     f"| {c['frechet_distance']:.0f} | {a['frechet_distance']:.0f} |")
    lines += ["", "RCFG vs CFG (img2img from one white-circle render, strength 0.8 of 5 steps / 25/32 of 32 steps, 196 "
              "target prompts; RCFG at CFG's "
              "scale 5 and at its reference default 1.2, delta 1):", "",
              "| steps | guidance, scale | NFE/image | images/s (eval pass) | speed-up vs CFG (paired, batch 49) "
              "| accuracy | clipped | FD |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["rcfg_vs_cfg"]:
        g = r["guidance"]
        name = f"cfg {g['scale']:g}" if g["name"] == "cfg" else f"rcfg {g['variant']} {g['scale']:g}"
        lines.append(f"| {r['steps']} | {name} | {r['nfe_per_image']} | {r['images_per_s']:.1f} "
                     f"| **{r['speedup_vs_cfg']:.2f}x** | {r['accuracy']:.3f} | {r['clipped_fraction']:.4f} "
                     f"| {r['frechet_distance']:.0f} |")
    if "rcfg_vs_cfg_tiny_vae" in result:
        lines += ["", "The same paired speed-ups with the tiny autoencoder (`vae: tiny`) at both ends, for CFG and "
                  "RCFG:",
                  "", "| steps | guidance, scale | speed-up vs CFG (paired, batch 49, tiny autoencoder) |",
                  "|---|---|---|"]
        for r in result["rcfg_vs_cfg_tiny_vae"]:
            g = r["guidance"]
            name = f"cfg {g['scale']:g}" if g["name"] == "cfg" else f"rcfg {g['variant']} {g['scale']:g}"
            lines.append(f"| {r['steps']} | {name} | **{r['speedup_vs_cfg']:.2f}x** |")
    cost = result["apg_cost"]
    lines += ["", f"APG cost: whole 25-step generations of 49 images, APG / CFG time = "
                  f"**{cost['generation_time_ratio_apg_over_cfg']:.3f}** (median of {cost['repeats']} interleaved "
                  f"pairs); the combine alone: CFG {cost['combine_us']['cfg']:.0f} µs, APG "
                  f"{cost['combine_us']['apg']:.0f} µs per step for 49 images."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/guidance_cpu.json")
    parser.add_argument("--grid", default="docs/images/guidance_grid.png")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parts", choices=["all", "rcfg", "rcfg_tiny_vae"], default="all",
                        help="rcfg: only (re)measure RCFG vs CFG (both autoencoders), rcfg_tiny_vae: only the "
                        "tiny-autoencoder speed-ups, into the existing --out")
    args = parser.parse_args()
    torch.manual_seed(0)
    engine = Engine()
    if args.parts != "all":
        result = json.loads(Path(args.out).read_text())
        if args.parts == "rcfg":
            result["rcfg_vs_cfg"] = rcfg_vs_cfg(engine, ShapesJudge.load(), real_renders(), args.repeats)
        result["rcfg_vs_cfg_tiny_vae"] = rcfg_vs_cfg_tiny_vae(engine, args.repeats)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(markdown(result))
        return
    judge = ShapesJudge.load()
    real = real_renders()
    result = {"benchmark": "guidance", "model": "shapes", "machine": machine(),
              "scale_sweep": scale_sweep(engine, judge, real)}
    picture_grid(engine, Path(args.grid))
    result["rcfg_vs_cfg"] = rcfg_vs_cfg(engine, judge, real, args.repeats)
    result["apg_cost"] = apg_cost(engine, args.repeats)
    result["rcfg_vs_cfg_tiny_vae"] = rcfg_vs_cfg_tiny_vae(engine, args.repeats)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
