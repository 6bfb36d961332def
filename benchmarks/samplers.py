"""Sampler benchmark: the gmm oracle (exact endpoints), the shipped `shapes` model, step overhead.

    python benchmarks/samplers.py --out benchmarks/results/samplers_cpu.json [--parts gmm,shapes,overhead]

1. gmm: mean endpoint error (L2, 2048 samples of the 9-mode mixture, exact probability-flow ODE
   endpoint of each sampler's own interval) vs NFE 5, 6, 8, 10, 15, 20, 50 for diffusers' DDIM,
   DPM-Solver++ 2M, UniPC and DEIS (2, 3), every DEIS variant and order, HB (beta 0.8, 0.9) and
   GHVB (1.5, 2.5, 3.8). Every sampler runs on the trailing grid (t = 999 first, as diffusers
   would), and ours also on their own noise-level grids.
   orders: the convergence orders of tests/schedulers/test_convergence.py as a table, and DEIS
   k >= 3 with its lower-order warm-up vs exact starting values.
2. shapes: prompt accuracy, FD-shapes and out-of-gamut pixels (< 10 or > 250) for the 196 prompts
   at 4, 6, 8, 10, 15, 25 steps with CFG 5 and 10, 25 steps with CFG 7.5 and 15; diffusers'
   anchors and ours, all in this one run on the shipped model.
   grids: DEIS order 3 (tab, logrho) at 25 steps, CFG 5 on every grid: the cause of the collapse.
   momentum_grids: HB 0.8 and GHVB 1.8 / 2.8 / 3.8 on five grids at 6, 8, 10 steps with CFG 5 and 7.5,
   against DDIM (trailing): the momentum target's cells.
   ceiling: 8 steps, CFG 5 with 10 seeds per prompt (1960 images) for the two best anchors and the
   two best of ours, where 196 images tie at 1.000.
3. overhead: time of one scheduler step (no model) on an SD-sized latent, ours vs diffusers'
   DPMSolverMultistepScheduler, interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
)
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from engine import machine

from accel_diffusion.engine import Engine
from accel_diffusion.eval.gmm_metrics import endpoint_error, observed_order
from accel_diffusion.eval.shapes_eval import evaluate_shapes, real_renders
from accel_diffusion.eval.shapes_judge import ShapesJudge
from accel_diffusion.models.gmm import GmmDenoiser
from accel_diffusion.models.gmm.mixture import pf_ode_endpoint
from accel_diffusion.models.gmm.pipeline import load_gmm_pipeline
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.schedulers.deis import DeisScheduler
from accel_diffusion.schedulers.ghvb import GhvbScheduler
from accel_diffusion.schedulers.heavy_ball import HeavyBallScheduler

GMM_NFES = (5, 6, 8, 10, 15, 20, 50)
GMM_SAMPLES = 2048
OUR_GRIDS = ("quadratic_t", "log_snr", "karras")


# --------------------------------------------------------------------------------------------
# 1. gmm oracle
# --------------------------------------------------------------------------------------------

def gmm_samplers(noise: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(name, grid, factory) for every sampler of the gmm study."""
    trailing = {**noise, "timestep_spacing": "trailing"}
    ours_trailing = {**trailing, "sigma_spacing": None}
    rows: list[tuple[str, str, Any]] = [
        ("diffusers DDIM", "trailing",
         lambda: DDIMScheduler(**trailing, set_alpha_to_one=True, clip_sample=False)),
        ("diffusers DPM-Solver++ 2M", "trailing", lambda: DPMSolverMultistepScheduler(**trailing)),
        ("diffusers UniPC", "trailing", lambda: UniPCMultistepScheduler(**trailing)),
        ("diffusers DEIS 2", "trailing", lambda: DEISMultistepScheduler(**trailing, solver_order=2)),
        ("diffusers DEIS 3", "trailing", lambda: DEISMultistepScheduler(**trailing, solver_order=3)),
    ]
    deis = [(variant, order) for variant in ("tab", "rhoab", "logrho", "ipndm") for order in (2, 3, 4)]
    momentum = [("HB 0.8 (DPM-Solver++ 2M)", HeavyBallScheduler, {"beta": 0.8}),
                ("HB 0.9 (DPM-Solver++ 2M)", HeavyBallScheduler, {"beta": 0.9}),
                ("HB 0.8 (PLMS-4)", HeavyBallScheduler, {"beta": 0.8, "base": "plms"}),
                *[(f"GHVB {label}", GhvbScheduler, {"order": label}) for label in (1.5, 2.5, 3.8)]]
    for grid_name, grid in [("trailing", ours_trailing), *[(g, {**noise, "sigma_spacing": g}) for g in OUR_GRIDS]]:
        rows.append(("DEIS order 1 (= DDIM)", grid_name, lambda grid=grid: DeisScheduler(**grid, order=1)))
        for variant, order in deis:
            rows.append((f"DEIS {variant} {order}", grid_name,
                         lambda grid=grid, v=variant, o=order: DeisScheduler(**grid, variant=v, order=o)))
        if grid_name == "trailing":  # same end point as diffusers' DEIS (which cannot go to sigma 0)
            for order in (2, 3):
                rows.append((f"DEIS logrho {order}, sigma_min end", grid_name, lambda grid=grid, o=order:
                             DeisScheduler(**grid, variant="logrho", order=o, final_sigmas_type="sigma_min")))
                rows.append((f"DEIS tab {order}, sigma_min end", grid_name, lambda grid=grid, o=order:
                             DeisScheduler(**grid, variant="tab", order=o, final_sigmas_type="sigma_min")))
        for name, cls, settings in momentum:
            rows.append((name, grid_name, lambda grid=grid, cls=cls, s=settings: cls(**grid, **s)))
    return rows


def final_rho(scheduler: Any) -> tuple[float, float]:
    """(first, last) noise level rho of a scheduler's trajectory after set_timesteps."""
    if hasattr(scheduler, "rho"):
        return float(scheduler.rho[0]), float(scheduler.rho[-1])
    acp = scheduler.alphas_cumprod.double()
    first = float(((1 - acp[int(scheduler.timesteps[0])]) / acp[int(scheduler.timesteps[0])]).sqrt())
    if isinstance(scheduler, DDIMScheduler):
        last_acp = float(scheduler.final_alpha_cumprod)
        return first, float(np.sqrt((1 - last_acp) / last_acp))
    return first, float(scheduler.sigmas[-1])


def gmm_study() -> dict[str, Any]:
    pipe = load_gmm_pipeline()
    denoiser = pipe.denoiser
    noise = {k: denoiser.config[k] for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")}
    x_T = torch.randn(GMM_SAMPLES, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact: dict[tuple[float, float], torch.Tensor] = {}
    rows = []
    samplers = gmm_samplers(noise)
    for name, grid, factory in tqdm(samplers, desc="gmm"):
        errors = {}
        for nfe in GMM_NFES:
            scheduler = factory()
            scheduler.set_timesteps(nfe)
            x = x_T.clone()
            for t in scheduler.timesteps:
                x = scheduler.step(denoiser(x, t).sample, t, x).prev_sample
            key = tuple(round(v, 12) for v in final_rho(scheduler))
            if key not in exact:
                exact[key] = pf_ode_endpoint(denoiser.mixture, x_T, key[0], key[1])
            errors[str(nfe)] = endpoint_error(x, exact[key])["mean"]
        rows.append({"sampler": name, "grid": grid, "mean_endpoint_error": errors})
    return {"samples": GMM_SAMPLES, "nfe": list(GMM_NFES), "rows": rows}


# --------------------------------------------------------------------------------------------
# 1b. convergence orders (the setting of tests/schedulers/test_convergence.py) and the warm-up
# --------------------------------------------------------------------------------------------

ORDER_STEPS = (10, 20, 40, 80)


def order_study() -> dict[str, Any]:
    """Observed global orders on the mixture, and the same k >= 3 DEIS with exact starting values."""
    pipe = load_gmm_pipeline()
    denoiser = pipe.denoiser
    noise = {k: denoiser.config[k] for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")}
    grid = {**noise, "sigma_spacing": "log_snr", "final_sigmas_type": "sigma_min"}
    cases: list[tuple[str, Any, int | str]] = [
        ("DDIM (DEIS order 1)", lambda: DeisScheduler(**grid, order=1), 1),
        ("HB 0.8 on DPM-Solver++ 2M", lambda: HeavyBallScheduler(**grid, beta=0.8, lower_order_final=False), 1),
        ("HB 0.8 on PLMS-4", lambda: HeavyBallScheduler(**grid, beta=0.8, base="plms"), 1),
        ("DPM-Solver++ 2M (HB beta 1)", lambda: HeavyBallScheduler(**grid, beta=1.0, lower_order_final=False), 2),
        *[(f"DEIS {v} {k}", lambda v=v, k=k: DeisScheduler(**grid, variant=v, order=k, lower_order_final=False),
           k if k <= 2 else f"{k} (2 with warm-up)") for v in ("tab", "rhoab", "logrho") for k in (2, 3, 4)],
        *[(f"DEIS ipndm {k}", lambda k=k: DeisScheduler(**grid, variant="ipndm", order=k, lower_order_final=False),
           2) for k in (2, 3, 4)],
        *[(f"GHVB {label}", lambda label=label: GhvbScheduler(**grid, order=label), 2) for label in (1.5, 2.5, 3.8)],
    ]
    x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    probe = cases[0][1]()
    probe.set_timesteps(10)
    exact = pf_ode_endpoint(denoiser.mixture, x_T, float(probe.rho[0]), float(probe.rho[-1]))
    rows = []
    for name, factory, theory in tqdm(cases, desc="orders"):
        errors = []
        for n in ORDER_STEPS:
            scheduler = factory()
            scheduler.set_timesteps(n)
            x = x_T
            for t in scheduler.timesteps:
                x = scheduler.step(denoiser(x, t).sample, t, x).prev_sample
            errors.append(endpoint_error(x, exact)["mean"])
        rows.append({"sampler": name, "theory": theory, "errors": errors,
                     "observed": observed_order(ORDER_STEPS, errors)})
    return {"steps": list(ORDER_STEPS), "rows": rows, "warm_up": warm_up_study(denoiser, noise)}


def warm_up_study(denoiser: Any, noise: dict[str, Any]) -> list[dict[str, Any]]:
    """One mixture component (a Gaussian), log-SNR steps on rho in [3, 0.1]: DEIS k = 3, 4 started
    with its usual lower-order warm-up vs with the exact trajectory for its first k - 1 states."""
    mixture = denoiser.mixture.component(8)
    model = GmmDenoiser.from_mixture(mixture, **noise)
    start = pf_ode_endpoint(mixture, torch.randn(64, 2, generator=torch.Generator().manual_seed(0),
                                                  dtype=torch.float64), model.rho_max, 3.0)
    end = pf_ode_endpoint(mixture, start, 3.0, 0.1)
    rows = []
    for variant in ("tab", "rhoab", "logrho"):
        for k in (3, 4):
            for exact_start in (False, True):
                errors = []
                for n in ORDER_STEPS:
                    scheduler = DeisScheduler(**noise, variant=variant, order=k, lower_order_final=False)
                    scheduler.set_timesteps(sigmas=np.geomspace(3.0, 0.1, n + 1))
                    x = start
                    for i, t in enumerate(scheduler.timesteps):
                        if exact_start and 0 < i < k - 1:
                            x = pf_ode_endpoint(mixture, start, 3.0, float(scheduler.rho[i]))
                        x = scheduler.step(model(x, t).sample, t, x).prev_sample
                    errors.append(endpoint_error(x, end)["mean"])
                rows.append({"sampler": f"DEIS {variant} {k}", "exact_start": exact_start, "errors": errors,
                             "observed": observed_order(ORDER_STEPS, errors)})
    return rows


# --------------------------------------------------------------------------------------------
# 2. shapes
# --------------------------------------------------------------------------------------------

CFG5_STEPS = (4, 6, 8, 10, 15, 25)
HIGH_CFG = ((7.5, (10, 25)), (15.0, (10, 25)))

SHAPES_SAMPLERS: list[tuple[str, str, dict, dict]] = [
    # (group, label, sampler, schedule)
    ("diffusers", "DDIM (trailing)", {"name": "ddim"}, {"name": "spacing", "spacing": "trailing"}),
    ("diffusers", "Euler", {"name": "euler"}, {"name": "spacing"}),
    ("diffusers", "DPM-Solver++ 2M", {"name": "dpmpp_2m"}, {"name": "spacing"}),
    ("diffusers", "DPM-Solver++ 2M karras", {"name": "dpmpp_2m"}, {"name": "karras"}),
    ("diffusers", "UniPC", {"name": "unipc"}, {"name": "spacing"}),
    ("diffusers", "DEIS 2", {"name": "diffusers_deis", "order": 2}, {"name": "spacing"}),
    ("diffusers", "DEIS 3", {"name": "diffusers_deis", "order": 3}, {"name": "spacing"}),
    ("ours", "DEIS tab 3 (quadratic-t)", {"name": "deis", "variant": "tab", "order": 3}, {"name": "spacing"}),
    ("ours", "DEIS tab 2 (quadratic-t)", {"name": "deis", "variant": "tab", "order": 2}, {"name": "spacing"}),
    ("ours", "DEIS logrho 3 (log-SNR)", {"name": "deis", "variant": "logrho", "order": 3},
     {"name": "spacing", "spacing": "log_snr"}),
    ("ours", "DEIS order 1 = DDIM (karras)", {"name": "deis", "order": 1}, {"name": "karras"}),
    ("ours", "DEIS order 1 = DDIM (log-SNR)", {"name": "deis", "order": 1}, {"name": "spacing", "spacing": "log_snr"}),
    ("ours", "HB 0.8 on DPM++ 2M (log-SNR)", {"name": "hb", "beta": 0.8}, {"name": "spacing"}),
    ("ours", "HB 0.8 on DPM++ 2M (model grid)", {"name": "hb", "beta": 0.8},
     {"name": "spacing", "spacing": "linspace"}),
    ("ours", "GHVB 1.8 (log-SNR)", {"name": "ghvb", "order": 1.8}, {"name": "spacing"}),
    ("ours", "GHVB 2.8 (log-SNR)", {"name": "ghvb", "order": 2.8}, {"name": "spacing"}),
    ("ours", "GHVB 3.8 (log-SNR)", {"name": "ghvb", "order": 3.8}, {"name": "spacing"}),
    ("ours", "PLMS-2 = GHVB 2.0 (log-SNR)", {"name": "ghvb", "order": 2.0}, {"name": "spacing"}),
    ("ours", "PLMS-3 = GHVB 3.0 (log-SNR)", {"name": "ghvb", "order": 3.0}, {"name": "spacing"}),
    ("ours", "PLMS-4 = GHVB 4.0 (log-SNR)", {"name": "ghvb", "order": 4.0}, {"name": "spacing"}),
    ("ours", "GHVB 0.8 = HB on DDIM (karras rho 3)", {"name": "ghvb", "order": 0.8}, {"name": "karras", "rho": 3.0}),
]


def cfg_cell_evaluator() -> Callable[..., dict[str, Any]]:
    """``evaluate(sampler, schedule, cfg_scale, steps, repeats=1)``: evaluate_shapes on the shipped model
    with CFG, sharing one engine, judge and set of real renders across the cells of a study."""
    engine = Engine(ModelRegistry.default())
    judge = ShapesJudge.load()
    real = real_renders()

    def evaluate(sampler: dict, schedule: dict, scale: float, steps: int, repeats: int = 1) -> dict[str, Any]:
        return evaluate_shapes(engine, strategy={"sampler": sampler, "schedule": schedule,
                                                 "guidance": {"name": "cfg", "scale": scale}},
                               steps=steps, repeats=repeats, judge=judge, real=real, progress=False)

    return evaluate


def shapes_cells() -> list[tuple[float, int]]:
    cells = [(5.0, steps) for steps in CFG5_STEPS]
    for scale, steps in HIGH_CFG:
        cells += [(scale, s) for s in steps]
    return cells


def shapes_study(only: set[str] | None = None) -> dict[str, Any]:
    evaluate = cfg_cell_evaluator()
    rows = []
    chosen = [s for s in SHAPES_SAMPLERS if only is None or s[1] in only]
    work = [(s, cell) for s in chosen for cell in shapes_cells()]
    for (group, label, sampler, schedule), (scale, steps) in tqdm(work, desc="shapes"):
        m = evaluate(sampler, schedule, scale, steps)
        rows.append({"group": group, "sampler": label, "cfg": scale, "steps": steps,
                     "accuracy": m["prompt_accuracy"]["all"], "frechet_distance": m["frechet_distance"],
                     "out_of_gamut": m["saturation"]["clipped_fraction"], "nfe_per_image": m["nfe_per_image"],
                     "strategy": m["strategy"]})
    return {"images_per_cell": 196, "rows": rows}


GRID_STUDY_SCHEDULES: list[tuple[str, dict]] = [
    ("leading", {"name": "spacing", "spacing": "leading"}),
    ("trailing", {"name": "spacing", "spacing": "trailing"}),
    ("linspace (the model's)", {"name": "spacing", "spacing": "linspace"}),
    ("uniform_t", {"name": "spacing", "spacing": "uniform_t"}),
    ("quadratic_t", {"name": "spacing", "spacing": "quadratic_t"}),
    ("log_snr", {"name": "spacing", "spacing": "log_snr"}),
    ("karras", {"name": "karras"}),
]


def grid_study() -> dict[str, Any]:
    """Why order-3 DEIS collapses under guidance: the same solvers on every grid, 25 steps, CFG 5."""
    evaluate = cfg_cell_evaluator()
    samplers = [("DEIS tab 3", {"name": "deis", "variant": "tab", "order": 3}),
                ("DEIS logrho 3", {"name": "deis", "variant": "logrho", "order": 3}),
                ("DEIS logrho 3, sigma_min end (= diffusers DEIS 3 on diffusers grids)",
                 {"name": "deis", "variant": "logrho", "order": 3, "final_sigmas_type": "sigma_min"})]
    rows = []
    for (label, sampler), (grid, schedule) in tqdm([(a, b) for a in samplers for b in GRID_STUDY_SCHEDULES],
                                                   desc="grids"):
        m = evaluate(sampler, schedule, 5.0, 25)
        rows.append({"sampler": label, "grid": grid, "accuracy": m["prompt_accuracy"]["all"],
                     "out_of_gamut": m["saturation"]["clipped_fraction"], "frechet_distance": m["frechet_distance"]})
    return {"steps": 25, "cfg": 5.0, "rows": rows}


MOMENTUM_SAMPLERS: list[tuple[str, dict]] = [
    ("HB 0.8 on DPM++ 2M", {"name": "hb", "beta": 0.8}),
    ("GHVB 1.8", {"name": "ghvb", "order": 1.8}),
    ("GHVB 2.8", {"name": "ghvb", "order": 2.8}),
    ("GHVB 3.8", {"name": "ghvb", "order": 3.8}),
]
MOMENTUM_GRIDS: list[tuple[str, dict]] = [
    ("log_snr", {"name": "spacing", "spacing": "log_snr"}),
    ("quadratic_t", {"name": "spacing", "spacing": "quadratic_t"}),
    ("karras 7", {"name": "karras"}),
    ("karras 3", {"name": "karras", "rho": 3.0}),
    ("trailing", {"name": "spacing", "spacing": "trailing"}),
]
MOMENTUM_CELLS = [(scale, steps) for scale in (5.0, 7.5) for steps in (6, 8, 10)]


def momentum_grid_study() -> dict[str, Any]:
    """The momentum target's cells (6, 8, 10 steps at CFG 5 and 7.5) for HB 0.8 and GHVB 1.8 / 2.8 / 3.8
    on five grids, against diffusers' DDIM (trailing) in the same run: is any grid enough to reach DDIM?"""
    evaluate = cfg_cell_evaluator()
    work = [("DDIM (trailing)", {"name": "ddim"}, "trailing", {"name": "spacing", "spacing": "trailing"})]
    work += [(label, sampler, grid, schedule) for label, sampler in MOMENTUM_SAMPLERS
             for grid, schedule in MOMENTUM_GRIDS]
    rows = []
    for (label, sampler, grid, schedule), (scale, steps) in tqdm(
            [(w, cell) for w in work for cell in MOMENTUM_CELLS], desc="momentum grids"):
        m = evaluate(sampler, schedule, scale, steps)
        rows.append({"sampler": label, "grid": grid, "cfg": scale, "steps": steps,
                     "accuracy": m["prompt_accuracy"]["all"], "out_of_gamut": m["saturation"]["clipped_fraction"]})
    return {"images_per_cell": 196, "rows": rows}


CEILING_SEEDS_PER_PROMPT = 10
CEILING_SAMPLERS: list[tuple[str, str, dict, dict]] = [
    ("diffusers", "DDIM (trailing)", {"name": "ddim"}, {"name": "spacing", "spacing": "trailing"}),
    ("diffusers", "Euler", {"name": "euler"}, {"name": "spacing"}),
    ("ours", "GHVB 0.8 = HB on DDIM (karras rho 3)", {"name": "ghvb", "order": 0.8}, {"name": "karras", "rho": 3.0}),
    ("ours", "DEIS order 1 = DDIM (karras)", {"name": "deis", "order": 1}, {"name": "karras"}),
]


def ceiling_study() -> dict[str, Any]:
    """8 steps, CFG 5, where the 196-prompt table ties at 1.000: the same prompts with 10 seeds each
    (1960 images per sampler) for the two best anchors and the two best of ours."""
    evaluate = cfg_cell_evaluator()
    rows = []
    for group, label, sampler, schedule in tqdm(CEILING_SAMPLERS, desc="8-step ceiling"):
        m = evaluate(sampler, schedule, 5.0, 8, repeats=CEILING_SEEDS_PER_PROMPT)
        images = m["images"]
        accuracy = m["prompt_accuracy"]["all"]
        rows.append({"group": group, "sampler": label, "accuracy": accuracy, "images": images,
                     "wrong": round((1.0 - accuracy) * images), "out_of_gamut": m["saturation"]["clipped_fraction"]})
    return {"steps": 8, "cfg": 5.0, "seeds_per_prompt": CEILING_SEEDS_PER_PROMPT, "rows": rows}


# --------------------------------------------------------------------------------------------
# 3. step overhead
# --------------------------------------------------------------------------------------------

def step_seconds(scheduler: Any, latent: torch.Tensor, output: torch.Tensor, steps: int = 25) -> float:
    """Mean wall time of ``scheduler.step`` over one full trajectory (no model)."""
    scheduler.set_timesteps(steps)
    x = latent.clone()
    begin = time.perf_counter()
    for t in scheduler.timesteps:
        x = scheduler.step(output, t, x, return_dict=False)[0]
    return (time.perf_counter() - begin) / steps


def step_overhead(repeats: int = 15) -> dict[str, Any]:
    config = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         steps_offset=1, timestep_spacing="leading").config
    ours = {
        "DEIS tab 3": lambda: DeisScheduler.from_config(config, variant="tab", order=3),
        "DEIS logrho 3": lambda: DeisScheduler.from_config(config, variant="logrho", order=3),
        "HB 0.8": lambda: HeavyBallScheduler.from_config(config, beta=0.8),
        "GHVB 3.8": lambda: GhvbScheduler.from_config(config, order=3.8),
    }
    result: dict[str, Any] = {"latent": [1, 4, 64, 64], "steps_per_trajectory": 25, "repeats": repeats}
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 64, 64, generator=generator)
    output = torch.randn(1, 4, 64, 64, generator=generator) * 0.1
    for name, factory in ours.items():
        theirs_s, ours_s = [], []
        for _ in range(repeats):  # interleaved, so drift hits both alike
            theirs_s.append(step_seconds(DPMSolverMultistepScheduler.from_config(config), latent, output))
            ours_s.append(step_seconds(factory(), latent, output))
        result[name] = {"ours_us": 1e6 * statistics.median(ours_s),
                        "dpm_solver_us": 1e6 * statistics.median(theirs_s),
                        "ratio": statistics.median(ours_s) / statistics.median(theirs_s),
                        "set_timesteps_ms": 1e3 * set_timesteps_seconds(factory()),
                        "dpm_solver_set_timesteps_ms": 1e3 * set_timesteps_seconds(
                            DPMSolverMultistepScheduler.from_config(config))}
    return result


def set_timesteps_seconds(scheduler: Any, steps: int = 25, repeats: int = 5) -> float:
    """Once per generation: the grid and (for DEIS) the float64 coefficient table."""
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        scheduler.set_timesteps(steps)
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------

def markdown(result: dict[str, Any]) -> str:
    out = []
    if "gmm" in result:
        gmm = result["gmm"]
        out.append(f"gmm oracle, mean endpoint error ({gmm['samples']} samples) vs NFE:\n")
        out.append("| sampler | grid | " + " | ".join(str(n) for n in gmm["nfe"]) + " |")
        out.append("|---|---|" + "---|" * len(gmm["nfe"]))
        for row in gmm["rows"]:
            errs = row["mean_endpoint_error"]
            out.append(f"| {row['sampler']} | {row['grid']} | "
                       + " | ".join(f"{errs[str(n)]:.2e}" for n in gmm["nfe"]) + " |")
        out.append("")
    if "orders" in result:
        orders = result["orders"]
        out.append("gmm convergence orders (log-SNR steps, N = 10, 20, 40, 80; mean endpoint error):\n")
        out.append("| sampler | theory | error at 10 / 80 | observed |")
        out.append("|---|---|---|---|")
        for row in orders["rows"]:
            out.append(f"| {row['sampler']} | {row['theory']} | {row['errors'][0]:.1e} / {row['errors'][-1]:.1e} | "
                       f"{row['observed']:.2f} |")
        out.append("\nwarm-up vs exact starting values (one Gaussian component, rho 3 -> 0.1):\n")
        out.append("| sampler | start | error at 10 / 80 | observed |")
        out.append("|---|---|---|---|")
        for row in orders["warm_up"]:
            out.append(f"| {row['sampler']} | {'exact' if row['exact_start'] else 'warm-up'} | "
                       f"{row['errors'][0]:.1e} / {row['errors'][-1]:.1e} | {row['observed']:.2f} |")
        out.append("")
    if "shapes" in result:
        rows = result["shapes"]["rows"]
        cells = sorted({(r["cfg"], r["steps"]) for r in rows})
        out.append("shapes, prompt accuracy / out-of-gamut % / FD per (CFG, steps):\n")
        out.append("| sampler | " + " | ".join(f"CFG {c:g}, {s}" for c, s in cells) + " |")
        out.append("|---|" + "---|" * len(cells))
        for label in dict.fromkeys(r["sampler"] for r in rows):
            by_cell = {(r["cfg"], r["steps"]): r for r in rows if r["sampler"] == label}
            out.append(f"| {label} | " + " | ".join(
                f"{by_cell[c]['accuracy']:.3f} / {100 * by_cell[c]['out_of_gamut']:.1f} / "
                f"{by_cell[c]['frechet_distance']:.0f}" if c in by_cell else "" for c in cells) + " |")
        out.append("")
    if "grids" in result:
        rows = result["grids"]["rows"]
        grids = list(dict.fromkeys(r["grid"] for r in rows))
        out.append("shapes, 25 steps, CFG 5, prompt accuracy / out-of-gamut % per grid:\n")
        out.append("| sampler | " + " | ".join(grids) + " |")
        out.append("|---|" + "---|" * len(grids))
        for label in dict.fromkeys(r["sampler"] for r in rows):
            by_grid = {r["grid"]: r for r in rows if r["sampler"] == label}
            out.append(f"| {label} | " + " | ".join(
                f"{by_grid[g]['accuracy']:.3f} / {100 * by_grid[g]['out_of_gamut']:.1f}" for g in grids) + " |")
        out.append("")
    if "momentum_grids" in result:
        rows = result["momentum_grids"]["rows"]
        out.append("shapes, momentum samplers on five grids, prompt accuracy / out-of-gamut % per (CFG, steps):\n")
        out.append("| sampler | grid | " + " | ".join(f"CFG {c:g}, {s}" for c, s in MOMENTUM_CELLS) + " |")
        out.append("|---|---|" + "---|" * len(MOMENTUM_CELLS))
        for label, grid in dict.fromkeys((r["sampler"], r["grid"]) for r in rows):
            by_cell = {(r["cfg"], r["steps"]): r for r in rows if (r["sampler"], r["grid"]) == (label, grid)}
            out.append(f"| {label} | {grid} | " + " | ".join(
                f"{by_cell[c]['accuracy']:.3f} / {100 * by_cell[c]['out_of_gamut']:.1f}" for c in MOMENTUM_CELLS)
                + " |")
        out.append("")
    if "ceiling_8_steps" in result:
        ceiling = result["ceiling_8_steps"]
        out.append(f"shapes, 8 steps, CFG 5, {ceiling['seeds_per_prompt']} seeds per prompt:\n")
        out.append("| sampler | images | wrong | accuracy | out-of-gamut % |")
        out.append("|---|---|---|---|---|")
        for row in ceiling["rows"]:
            out.append(f"| {row['sampler']} | {row['images']} | {row['wrong']} | {row['accuracy']:.4f} | "
                       f"{100 * row['out_of_gamut']:.2f} |")
        out.append("")
    if "overhead" in result:
        over = result["overhead"]
        out.append("step overhead (one scheduler step, no model, 1x4x64x64 latent), median of interleaved runs:\n")
        out.append("| sampler | ours µs | DPM-Solver++ µs | ratio | set_timesteps(25) ms, ours / DPM-Solver++ |")
        out.append("|---|---|---|---|---|")
        for name, row in over.items():
            if isinstance(row, dict):
                out.append(f"| {name} | {row['ours_us']:.0f} | {row['dpm_solver_us']:.0f} | {row['ratio']:.2f} | "
                           f"{row['set_timesteps_ms']:.2f} / {row['dpm_solver_set_timesteps_ms']:.2f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/samplers_cpu.json")
    parser.add_argument("--parts", default="gmm,orders,shapes,grids,overhead")
    parser.add_argument("--shapes-only", default="", help="comma-separated sampler labels (default: all)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    out = Path(args.out)
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    result.update({"benchmark": "samplers", "machine": machine()})
    if "gmm" in parts:
        result["gmm"] = gmm_study()
    if "orders" in parts:
        result["orders"] = order_study()
    if "shapes" in parts:
        only = set(args.shapes_only.split(",")) if args.shapes_only else None
        fresh = shapes_study(only)
        if only and "shapes" in result:  # re-measure some samplers, keep the rest, in the table's order
            kept = [r for r in result["shapes"]["rows"] if r["sampler"] not in only]
            order = [label for _, label, _, _ in SHAPES_SAMPLERS]
            fresh["rows"] = sorted(kept + fresh["rows"], key=lambda r: order.index(r["sampler"]))
        result["shapes"] = fresh
    if "grids" in parts:
        result["grids"] = grid_study()
    if "momentum_grids" in parts:
        result["momentum_grids"] = momentum_grid_study()
    if "ceiling" in parts:
        result["ceiling_8_steps"] = ceiling_study()
    if "overhead" in parts:
        result["overhead"] = step_overhead()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
