"""``accel-diffusion distill``: train a student of a teacher with one method, write it as a model directory.

One documented recipe per (method, teacher); ``--iterations`` is the budget, ``--seed`` fixes every random
number, and a run that was interrupted resumes from ``OUT/training_state/checkpoint.pt`` with the same result
as an uninterrupted run (the state is removed once the model is written). Methods: ``fdistill``, ``disback``,
``slimflow``. Teachers: ``gmm`` (the analytic oracle) and ``shapes`` (the built-in text-to-image model,
``students/shapes.py``) for every method.
"""

from __future__ import annotations

import shlex
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from accel_diffusion.errors import InvalidRequestError
from accel_diffusion.students.disback import DisBack, fit_denoiser, record_degradation
from accel_diffusion.students.export import save_gmm_student
from accel_diffusion.students.fdistill import DIVERGENCES, FDistill
from accel_diffusion.students.networks import MlpDenoiser, MlpGenerator
from accel_diffusion.students.slimflow import AnnealingReflow, FlowGenerator, FlowGuidedDistillation, teacher_pairs
from accel_diffusion.students.teachers import GmmTeacher
from accel_diffusion.students.trainer import TrainConfig, train

METHODS = ("fdistill", "disback", "slimflow")
TEACHERS = ("gmm", "shapes")
SHAPES_METHODS = ("fdistill", "disback", "slimflow")
STATE_DIR = "training_state"

GMM_FDISTILL = {"hidden": 64, "lr_student": 1e-3, "student_update_freq": 3}
"""The gmm f-distill recipe (tests/students/test_fdistill_gmm.py measures it at 1,500 iterations)."""
GMM_DISBACK = {"hidden": 64, "layers": 3, "teacher_fit_iterations": 1500, "degradation_iterations": 600,
               "degradation_interval": 100, "backtrack_interval": 40}
"""The gmm DisBack recipe: an MLP teacher fitted to the oracle, a path of 7 nodes, 40 generator steps a node."""
GMM_SLIMFLOW = {"pairs": 4000, "hidden": 64, "layers": 3, "schedule": "linear"}
"""The gmm SlimFlow recipe: annealing reflow for ``iterations`` (β → 0 over the first half), then flow-guided
distillation for a third of that (tests/students/test_slimflow.py measures it at 1,500 iterations)."""
SHAPES_FDISTILL = {"pairs": 4096, "pair_steps": 8, "regression_fraction": 0.85, "batch_size": 32,
                   "lr_regression": 3e-4, "regression_schedule": "cosine", "lr_student": 1e-5, "lr_fake": 1e-4,
                   "lr_discriminator": 1e-4, "student_update_freq": 5, "regression_weight": 1.0, "ema_decay": 0.995}
"""The shapes f-distill recipe: 4,096 teacher ODE pairs (DDIM, 8 steps, CFG 5: 0.995 prompt accuracy), DMD's
regression loss alone for the first 85% of ``iterations`` (Adam at 3e-4 falling along a half cosine to 1e-5),
then the f-divergence loop with the regression term beside it."""
SHAPES_DISBACK = {"pairs": 12288, "pair_steps": 8, "regression_fraction": 0.8, "batch_size": 32,
                  "lr_regression": 3e-4, "lr_student": 1e-5, "lr_fake": 1e-4, "degradation_iterations": 200,
                  "degradation_interval": 40, "degradation_lr": 1e-4, "backtrack_interval": 10,
                  "student_update_freq": 5, "regression_weight": 1.0, "ema_decay": 0.995}
"""The shapes DisBack recipe: G0 = DMD's regression loss alone on 12,288 teacher ODE pairs for 80% of
``iterations`` (Adam 3e-4 along a half cosine to 1e-5); stage 1 records 200 DSM iterations of a teacher copy on
G0's samples (a node every 40: a path of 6 with the teacher); stage 2 backtracks through it (10 generator steps a
node, then the teacher) for the remaining 20% with the regression term beside the DMD term."""
SHAPES_SLIMFLOW = {"pairs": 12288, "pair_steps": 8, "block_out_channels": [32, 60], "norm_num_groups": 4,
                   "distill_fraction": 0.25, "batch_size": 64, "lr_reflow": 5e-4, "lr_distill": 1e-4,
                   "schedule": "linear", "ema_decay": 0.995, "decoder": "tiny"}
"""The shapes SlimFlow recipe: a UNet of the teacher's layout at channels (32, 60) (0.23x its parameters),
predicting the data end (``slimflow.ShapesDataFlow``), trained by annealing reflow on 12,288 teacher ODE pairs for
75% of ``iterations`` (β → 0 over the first half of it), then flow-guided distillation for the rest; the
directory's autoencoder is the teacher's tiny one (``tiny_vae``: a third of the decode time)."""


def distill(method: str, teacher: str, out_dir: str | Path, *, iterations: int = 1500, seed: int = 0,
            divergence: str = "js", resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Train and write the student; returns its training info (the model card's numbers)."""
    if method not in METHODS:
        raise InvalidRequestError("method", f"unknown {method!r}", list(METHODS))
    if teacher not in TEACHERS:
        raise InvalidRequestError("teacher", f"{teacher!r} has no distillation recipe yet", list(TEACHERS))
    if divergence not in DIVERGENCES:
        raise InvalidRequestError("divergence", f"unknown {divergence!r}", list(DIVERGENCES))
    if iterations < 1:
        raise InvalidRequestError("iterations", f"must be >= 1, got {iterations}")
    out = Path(out_dir)
    if teacher == "shapes":
        if method not in SHAPES_METHODS:
            raise InvalidRequestError("method", f"{method!r} has no recipe for teacher 'shapes' yet",
                                      list(SHAPES_METHODS))
        return _distill_shapes(method, out, iterations=iterations, seed=seed, divergence=divergence,
                               resume=resume, progress=progress)
    gmm = GmmTeacher()
    started = time.perf_counter()
    config = TrainConfig(iterations=iterations, seed=seed, ema_decay=0.99, eval_every=max(iterations // 5, 1),
                         checkpoint_every=max(iterations // 10, 1), progress=progress)
    if method == "slimflow":
        result, recipe_method = _slimflow(gmm, seed, iterations, out / STATE_DIR, resume, progress)
    else:
        if method == "fdistill":
            runner: Any = FDistill(gmm, divergence=divergence, init_seed=seed, **GMM_FDISTILL)
            recipe_method = runner.config
        else:
            runner, recipe_method = _disback(gmm, seed)
        result = train(runner, config, out_dir=out / STATE_DIR, evaluate=gmm.evaluate, resume=resume)
    quality = gmm.evaluate(result.ema)
    command = shlex.join(["accel-diffusion", "distill", "--method", method, "--teacher", teacher, "--out",
                          str(out), "--iterations", str(iterations), "--seed", str(seed)]
                         + (["--divergence", divergence] if method == "fdistill" else []))
    wall = time.perf_counter() - started
    save_gmm_student(result.ema, out, gmm, name=out.name, method=method,
                     recipe={"method": recipe_method, "train": config.model_dump(), "history": result.history},
                     command=command, wall_seconds=wall, quality=quality)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return {"out": str(out), "method": method, "teacher": teacher, "iterations": iterations,
            "resumed_from": result.resumed_from, "wall_seconds": round(wall, 3), "quality": quality}


def _disback(gmm: GmmTeacher, seed: int) -> tuple[DisBack, dict[str, Any]]:
    """Stage 1 (deterministic from the seed, so a resumed run recomputes the same path) and the stage-2 method."""
    r = GMM_DISBACK
    network = {"dim": gmm.dim, "hidden": r["hidden"], "layers": r["layers"],
               "num_train_timesteps": gmm.num_train_timesteps}
    rng = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher_network = MlpDenoiser(**network)
        initial = MlpGenerator(dim=gmm.dim, hidden=r["hidden"], layers=r["layers"],
                               timestep=gmm.num_train_timesteps - 1)
    fit_denoiser(gmm, teacher_network, r["teacher_fit_iterations"], rng)
    path = record_degradation(teacher_network, initial, gmm, iterations=r["degradation_iterations"],
                              interval=r["degradation_interval"], rng=rng)
    method = DisBack(gmm, path, initial, network, interval=r["backtrack_interval"])
    return method, {**r, **method.config}


def _slimflow(gmm: GmmTeacher, seed: int, iterations: int, state: Path, resume: bool,
              progress: bool) -> tuple[Any, dict[str, Any]]:
    """Annealing reflow on exact teacher pairs, then flow-guided distillation; each stage resumable."""
    r = GMM_SLIMFLOW
    network = {"dim": gmm.dim, "hidden": r["hidden"], "layers": r["layers"],
               "num_train_timesteps": gmm.num_train_timesteps}
    pairs = teacher_pairs(gmm, r["pairs"], torch.Generator().manual_seed(seed))
    reflow = AnnealingReflow(pairs, network, schedule=r["schedule"], horizon=iterations // 2, init_seed=seed)
    stage1 = train(reflow, TrainConfig(iterations=iterations, seed=seed, ema_decay=0.99, progress=progress,
                                       checkpoint_every=max(iterations // 10, 1)),
                   out_dir=state / "reflow", resume=resume)
    distillation = FlowGuidedDistillation(pairs, stage1.ema)
    steps = max(iterations // 3, 1)
    stage2 = train(distillation, TrainConfig(iterations=steps, seed=seed + 1, ema_decay=0.99, progress=progress,
                                             eval_every=max(steps // 5, 1), checkpoint_every=max(steps // 10, 1)),
                   out_dir=state / "distill", evaluate=gmm.evaluate, resume=resume)
    stage2.resumed_from = stage1.resumed_from
    return stage2, {**r, "reflow": reflow.config | {"pairs": r["pairs"]}, "distillation": distillation.config,
                    "reflow_iterations": iterations, "distillation_iterations": steps,
                    "reflow_1step_mmd": gmm.evaluate(FlowGenerator.from_velocity(stage1.ema))["mmd"]}


def _distill_shapes(method: str, out: Path, *, iterations: int, seed: int, divergence: str, resume: bool,
                    progress: bool) -> dict[str, Any]:
    """A ``shapes`` student: teacher pairs (cached in the state directory), the method's stages, the export."""
    from accel_diffusion.students.export import save_shapes_student
    from accel_diffusion.students.shapes import ShapesTeacher

    recipe = {"fdistill": SHAPES_FDISTILL, "disback": SHAPES_DISBACK, "slimflow": SHAPES_SLIMFLOW}[method]
    started = time.perf_counter()
    shapes = ShapesTeacher()
    state = out / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    pairs_file = state / "pairs.pt"
    if resume and pairs_file.is_file():
        data = torch.load(pairs_file, weights_only=True)
    else:
        data = shapes.ode_pairs(recipe["pairs"], seed, steps=recipe["pair_steps"], progress=progress)
        torch.save(data, pairs_file)
    pairs_seconds = time.perf_counter() - started
    run = {"fdistill": _shapes_fdistill, "disback": _shapes_disback, "slimflow": _shapes_slimflow}[method]
    result, method_config, train_config, prediction = run(shapes, data, iterations=iterations, seed=seed,
                                                          divergence=divergence, state=state, resume=resume,
                                                          progress=progress)
    decoder = shapes.loaded.tiny_vae if recipe.get("decoder") == "tiny" else None
    quality = shapes.evaluate(result.ema, prediction=prediction, vae=decoder)
    command = shlex.join(["accel-diffusion", "distill", "--method", method, "--teacher", "shapes", "--out",
                          str(out), "--iterations", str(iterations), "--seed", str(seed)]
                         + (["--divergence", divergence] if method == "fdistill" else []))
    wall = time.perf_counter() - started
    save_shapes_student(result.ema, out, shapes.loaded.pipeline, shapes.loaded.scheduler_config, name=out.name,
                        method=method, recipe={"method": method_config, "recipe": recipe, "train": train_config,
                                               "history": result.history, "pairs_seconds": round(pairs_seconds, 1)},
                        command=command, wall_seconds=wall, quality=quality, prediction_type=prediction,
                        vae=decoder)
    shutil.rmtree(state, ignore_errors=True)
    return {"out": str(out), "method": method, "teacher": "shapes", "iterations": iterations,
            "resumed_from": result.resumed_from, "wall_seconds": round(wall, 3), "quality": quality}


def _shapes_fdistill(shapes: Any, data: dict[str, torch.Tensor], *, iterations: int, seed: int, divergence: str,
                     state: Path, resume: bool, progress: bool) -> tuple[Any, dict[str, Any], dict[str, Any], str]:
    from accel_diffusion.students.shapes import ShapesFDistill

    r = SHAPES_FDISTILL
    runner = ShapesFDistill(shapes, data, divergence=divergence, batch_size=r["batch_size"],
                            regression_iterations=int(iterations * r["regression_fraction"]),
                            regression_weight=r["regression_weight"], student_update_freq=r["student_update_freq"],
                            lr_student=r["lr_student"], lr_regression=r["lr_regression"], lr_fake=r["lr_fake"],
                            lr_discriminator=r["lr_discriminator"], init_seed=seed,
                            regression_schedule=r["regression_schedule"])
    config = TrainConfig(iterations=iterations, seed=seed, ema_decay=r["ema_decay"],
                         eval_every=max(iterations // 8, 1), checkpoint_every=max(iterations // 16, 1),
                         progress=progress)
    result = train(runner, config, out_dir=state, evaluate=shapes.evaluate, resume=resume)
    return result, runner.config, config.model_dump(), "epsilon"


def _shapes_disback(shapes: Any, data: dict[str, torch.Tensor], *, iterations: int, seed: int, divergence: str,
                    state: Path, resume: bool, progress: bool) -> tuple[Any, dict[str, Any], dict[str, Any], str]:
    """G0 by regression, stage 1 (deterministic from the seed; the path is kept in the state directory so a
    resumed run reloads it), stage 2; each stage resumable."""
    from accel_diffusion.students.disback import ShapesDisBack, record_shapes_degradation
    from accel_diffusion.students.shapes import ShapesRegression

    r = SHAPES_DISBACK
    g0_iterations = max(int(iterations * r["regression_fraction"]), 1)
    backtrack_iterations = max(iterations - g0_iterations, 1)
    regression = ShapesRegression(shapes, data, iterations=g0_iterations, batch_size=r["batch_size"],
                                  lr=r["lr_regression"], lr_end=r["lr_student"])
    g0_config = TrainConfig(iterations=g0_iterations, seed=seed, ema_decay=r["ema_decay"],
                            eval_every=max(g0_iterations // 4, 1), checkpoint_every=max(g0_iterations // 10, 1),
                            progress=progress)
    g0 = train(regression, g0_config, out_dir=state / "g0", evaluate=shapes.evaluate, resume=resume)
    path_file = state / "path.pt"
    if resume and path_file.is_file():
        path = torch.load(path_file, weights_only=True)
    else:
        path = record_shapes_degradation(shapes, g0.ema, iterations=r["degradation_iterations"],
                                         interval=r["degradation_interval"], lr=r["degradation_lr"],
                                         batch_size=r["batch_size"], rng=torch.Generator().manual_seed(seed + 1),
                                         progress=progress)
        torch.save(path, path_file)
    method = ShapesDisBack(shapes, path, g0.ema, data, interval=r["backtrack_interval"],
                           batch_size=r["batch_size"], student_update_freq=r["student_update_freq"],
                           lr_student=r["lr_student"], lr_fake=r["lr_fake"], regression_weight=r["regression_weight"])
    config = TrainConfig(iterations=backtrack_iterations, seed=seed + 2, ema_decay=r["ema_decay"],
                         eval_every=max(backtrack_iterations // 4, 1),
                         checkpoint_every=max(backtrack_iterations // 10, 1), progress=progress)
    result = train(method, config, out_dir=state / "backtrack", evaluate=shapes.evaluate, resume=resume)
    result.history = [{"stage": "g0", **h} for h in g0.history] + [{"stage": "backtrack", **h}
                                                                    for h in result.history]
    result.resumed_from = g0.resumed_from
    return result, {"g0": regression.config, "degradation": {k: r[k] for k in (
        "degradation_iterations", "degradation_interval", "degradation_lr")}, "backtrack": method.config}, {
        "g0": g0_config.model_dump(), "backtrack": config.model_dump()}, "epsilon"


def _shapes_slimflow(shapes: Any, data: dict[str, torch.Tensor], *, iterations: int, seed: int, divergence: str,
                     state: Path, resume: bool, progress: bool) -> tuple[Any, dict[str, Any], dict[str, Any], str]:
    """Annealing reflow into the small data-predicting UNet, then flow-guided distillation; each stage resumable."""
    from functools import partial

    from accel_diffusion.students.slimflow import ShapesDataFlow

    r = SHAPES_SLIMFLOW
    flow = ShapesDataFlow(shapes.cond)
    network = {k: v for k, v in shapes.unet.config.items() if not k.startswith("_")}
    network.update(block_out_channels=list(r["block_out_channels"]), norm_num_groups=r["norm_num_groups"])
    pairs = (data["z"], data["x0"], data["prompt"])
    distill_iterations = max(int(iterations * r["distill_fraction"]), 1)
    reflow_iterations = max(iterations - distill_iterations, 1)
    evaluate = partial(shapes.evaluate, prediction="sample")
    reflow = AnnealingReflow(pairs, network, schedule=r["schedule"], horizon=reflow_iterations // 2,
                             batch_size=r["batch_size"], lr=r["lr_reflow"], init_seed=seed, flow=flow)
    reflow_config = TrainConfig(iterations=reflow_iterations, seed=seed, ema_decay=r["ema_decay"],
                                eval_every=max(reflow_iterations // 4, 1),
                                checkpoint_every=max(reflow_iterations // 10, 1), progress=progress)
    stage1 = train(reflow, reflow_config, out_dir=state / "reflow", evaluate=evaluate, resume=resume)
    distillation = FlowGuidedDistillation(pairs, stage1.ema, batch_size=r["batch_size"], lr=r["lr_distill"],
                                          flow=flow)
    config = TrainConfig(iterations=distill_iterations, seed=seed + 1, ema_decay=r["ema_decay"],
                         eval_every=max(distill_iterations // 4, 1),
                         checkpoint_every=max(distill_iterations // 10, 1), progress=progress)
    result = train(distillation, config, out_dir=state / "distill", evaluate=evaluate, resume=resume)
    result.history = [{"stage": "reflow", **h} for h in stage1.history] + [{"stage": "distill", **h}
                                                                          for h in result.history]
    result.resumed_from = stage1.resumed_from
    return result, {"reflow": reflow.config, "distillation": distillation.config, "network": network}, {
        "reflow": reflow_config.model_dump(), "distill": config.model_dump()}, "sample"
