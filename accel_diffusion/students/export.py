"""Writing a trained student as a model directory: diffusers format, safetensors, and a model card.

A student directory is loaded by exactly the code that loads any model (``models/loading.py`` via a
registry entry, or ``from_pretrained``). Its ``README.md`` (the model card) and ``training_info.json`` record
the method, the recipe (the method's constructor arguments and the run's ``TrainConfig``), the command that
trained it, the wall time and the measured quality.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, ModelMixin

from accel_diffusion.models.gmm import GmmPipeline
from accel_diffusion.students.teachers import GmmTeacher

TRAINING_INFO = "training_info.json"


def one_step_scheduler(teacher: GmmTeacher) -> DDIMScheduler:
    """DDIM on the teacher's noise schedule that turns one step from t = T−1 into the student's output.

    ``prediction_type="sample"`` takes the student's output as x0; ``set_alpha_to_one=True`` makes the last
    step land on x0 itself; "trailing" spacing puts the single step at the top timestep, where z ~ N(0, I).
    """
    cfg = teacher.denoiser.config
    return DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         beta_start=cfg.beta_start, beta_end=cfg.beta_end, prediction_type="sample",
                         clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing")


def write_model_card(out_dir: str | Path, *, name: str, method: str, teacher: str, recipe: dict[str, Any],
                     command: str, wall_seconds: float, quality: dict[str, Any], steps: list[int],
                     parameters: int) -> None:
    """``README.md`` and ``training_info.json`` of a student directory (the numbers are the run's own)."""
    out = Path(out_dir)
    info = {"name": name, "method": method, "teacher": teacher, "steps": steps, "parameters": parameters,
            "recipe": recipe, "command": command, "wall_seconds": round(wall_seconds, 3), "quality": quality}
    (out / TRAINING_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    lines = [
        f"# {name}", "",
        f"A {'/'.join(map(str, steps))}-step student of `{teacher}`, distilled with **{method}** by accel-diffusion.",
        "", "## Training", "", "```", command, "```", "",
        f"Wall time: {wall_seconds:.1f} s. Parameters: {parameters:,}.", "",
        "Recipe (the method's arguments and the run's settings):", "", "```json",
        json.dumps(recipe, indent=2, sort_keys=True), "```", "",
        "## Measured quality", "", "| metric | value |", "|---|---|",
        *[f"| {key} | {json.dumps(value)} |" for key, value in sorted(quality.items())], "",
        "Load it with `accel-diffusion` through a registry entry (`source = \"local\"`), or with "
        "`from_pretrained` on this directory.", "",
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


def save_gmm_student(student: ModelMixin, out_dir: str | Path, teacher: GmmTeacher, *, name: str, method: str,
                     recipe: dict[str, Any], command: str, wall_seconds: float, quality: dict[str, Any]) -> Path:
    """Save a one-step student of the ``gmm`` oracle (a ``ModelMixin`` mapping z to x0: ``MlpGenerator``,
    SlimFlow's ``FlowGenerator``) as a ``GmmPipeline`` directory (safetensors + card)."""
    out = Path(out_dir)
    pipe = GmmPipeline(denoiser=student, scheduler=one_step_scheduler(teacher))
    pipe.save_pretrained(str(out), safe_serialization=True)
    parameters = sum(p.numel() for p in student.parameters())
    write_model_card(out, name=name, method=method, teacher="gmm", recipe=recipe, command=command,
                     wall_seconds=wall_seconds, quality=quality, steps=[1], parameters=parameters)
    return out


def shapes_one_step_scheduler(scheduler_config: dict[str, Any], prediction_type: str | None = None) -> DDIMScheduler:
    """DDIM on the teacher's training schedule whose single "trailing" step from t = 999 is the student's sample.

    A student that keeps the teacher's eps parameterization (f-distill, DisBack) lands with ``set_alpha_to_one``
    on ``(z − σ_T ε) / α_T``, the x0 it was trained to produce (``students/shapes.py``); one that predicts the
    sample itself (SlimFlow's small UNet) is exported with ``prediction_type="sample"``.
    """
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
    return DDIMScheduler(**{k: scheduler_config[k] for k in keys},
                         prediction_type=prediction_type or scheduler_config["prediction_type"], clip_sample=False,
                         set_alpha_to_one=True, steps_offset=1,
                         timestep_spacing="trailing")  # "trailing" ignores the offset: t = [999]


def save_shapes_student(student: ModelMixin, out_dir: str | Path, teacher_pipeline: Any,
                        scheduler_config: dict[str, Any], *, name: str, method: str, recipe: dict[str, Any],
                        command: str, wall_seconds: float, quality: dict[str, Any], teacher: str = "shapes",
                        prediction_type: str | None = None, unet_dtype: str = "float16", vae: Any = None) -> Path:
    """Save a one-step student UNet as a ``StableDiffusionPipeline`` directory: the teacher's tokenizer, text
    encoder and VAE, the student UNet (safetensors in ``unet_dtype``: float16 halves the shipped bytes, and
    diffusers' ``from_pretrained`` upcasts it to the model's float32 on load) and
    :func:`shapes_one_step_scheduler`; plain diffusers loads and runs it on CPU with no extra arguments
    (``num_inference_steps=1, guidance_scale=1``). ``vae`` replaces the teacher's autoencoder (SlimFlow's
    student ships with the teacher's tiny one: the decode is most of a one-step image's time)."""
    from diffusers import StableDiffusionPipeline

    if unet_dtype not in ("float16", "float32"):
        raise ValueError(f"unet_dtype: 'float16' or 'float32', got {unet_dtype!r}")
    out = Path(out_dir)
    unet = copy.deepcopy(student).to(getattr(torch, unet_dtype))
    if vae is not None:  # a replacement autoencoder is stored like the UNet
        vae = copy.deepcopy(vae).to(getattr(torch, unet_dtype))
    pipe = StableDiffusionPipeline(
        vae=vae if vae is not None else teacher_pipeline.vae, text_encoder=teacher_pipeline.text_encoder,
        tokenizer=teacher_pipeline.tokenizer,
        unet=unet, scheduler=shapes_one_step_scheduler(scheduler_config, prediction_type),
        safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    parameters = sum(p.numel() for p in student.parameters())
    write_model_card(out, name=name, method=method, teacher=teacher, recipe=recipe, command=command,
                     wall_seconds=wall_seconds, quality=quality, steps=[1], parameters=parameters)
    return out
