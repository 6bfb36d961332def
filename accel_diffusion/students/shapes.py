"""Distilling the ``shapes`` text-to-image model into a one-step student UNet (spec §1 on an image teacher).

- :class:`ShapesTeacher`: the shipped ``shapes`` pipeline as a teacher: its UNet's CFG x0-prediction (the
  quality setting, scale 5) at integer timesteps, the 196 prompts' text encodings, and teacher ODE pairs
  (z, prompt) -> x0 latents drawn through the engine's one loop (``engine.loop.denoise``) with DDIM at CFG 5
  (8 steps give 0.995 prompt accuracy, as 25 DPM-Solver++ steps do, where 12 DPM-Solver++ steps give 0.71);
- the student is a copy of the teacher UNet run once at t = 999 in the teacher's own eps parameterization:
  ``x0 = (z − σ_T ε) / α_T``, which is exactly what diffusers' DDIM does in one "trailing" step with
  ``set_alpha_to_one`` (so the exported directory runs as a plain ``StableDiffusionPipeline``); at
  initialization the student is the teacher's own 1-step DDIM sample;
- :class:`ShapesFDistill`: f-distill's DMD2 two-time-scale iteration (the weights and generator gradient of
  ``fdistill.py``) on this conditional image teacher, with DMD's regression loss on the teacher ODE pairs
  (a warm-start phase of pure regression, then the regression term beside the f-divergence term); the fake
  score is a second copy of the teacher UNet and the discriminator a head on its mid-block features.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from accel_diffusion.engine.engine import prepare_strategy
from accel_diffusion.engine.loop import denoise
from accel_diffusion.eval.image_stats import to_uint8_nhwc
from accel_diffusion.eval.shapes_eval import shapes_prompts
from accel_diffusion.eval.shapes_judge import ShapesJudge
from accel_diffusion.guidance.base import COND, UNCOND
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.strategy import Strategy
from accel_diffusion.students.fdistill import FDivWeight, generator_gradient
from accel_diffusion.students.networks import DiscriminatorHead
from accel_diffusion.students.trainer import NoExtraState, optimizer_step

STUDENT_TIMESTEP = 999
TEACHER_STRATEGY = {"sampler": {"name": "ddim"}, "schedule": {"name": "spacing"},
                    "guidance": {"name": "cfg", "scale": 5.0}}
"""The strategy the ODE pairs are drawn with: DDIM, CFG 5. Measured on the 196 prompts (one pair each, seed 0):
8 DDIM steps 0.995 prompt accuracy (12.7 s); DPM-Solver++ 2M 8 steps 0.347, 12 steps 0.714, 25 steps 0.995 —
the few-step DPM-Solver++ targets the first shipped student regressed were wrong for 3 prompts in 10."""


class ShapesTeacher:
    """The ``shapes`` model (or another SD-family entry of the registry) as a distillation teacher."""

    def __init__(self, model: str = "shapes", guidance_scale: float = 5.0, t_min: int = 20, t_max: int = 980,
                 registry: ModelRegistry | None = None) -> None:
        self.loaded = (registry or ModelRegistry.default()).get(model)
        pipe = self.loaded.pipeline
        self.unet: UNet2DConditionModel = pipe.unet.eval().requires_grad_(False)
        self.vae = pipe.vae
        self.guidance_scale = float(guidance_scale)
        self.num_train_timesteps = int(self.loaded.scheduler_config["num_train_timesteps"])
        if not 0 <= t_min < t_max <= self.num_train_timesteps - 1:
            raise ValueError(f"t_min/t_max: need 0 <= t_min < t_max <= {self.num_train_timesteps - 1}, "
                             f"got {t_min}, {t_max}")
        self.t_min, self.t_max = int(t_min), int(t_max)
        betas = _betas(self.loaded.scheduler_config)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, 0).float()
        self.prompts = shapes_prompts()
        encoded = self.loaded.prompt_encoder.conditioning(self.prompts, None, True, None)
        self.cond = encoded.branches[COND]["encoder_hidden_states"].float()
        self.uncond = encoded.branches[UNCOND]["encoder_hidden_states"][:1].float()
        self.latent_shape = (int(self.unet.config.in_channels), int(self.unet.config.sample_size),
                             int(self.unet.config.sample_size))

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α, σ) shaped (B, 1, 1, 1) at integer timesteps t (B,)."""
        acp = self.alphas_cumprod[t.long()].reshape(-1, 1, 1, 1)
        return acp.sqrt(), (1 - acp).sqrt()

    def sample_timesteps(self, n: int, rng: torch.Generator) -> torch.Tensor:
        return torch.randint(self.t_min, self.t_max + 1, (n,), generator=rng)

    def sample_prompts(self, n: int, rng: torch.Generator) -> torch.Tensor:
        return torch.randint(0, len(self.prompts), (n,), generator=rng)

    def noised(self, x0: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.sample_timesteps(x0.shape[0], rng)
        alpha, sigma = self.alpha_sigma(t)
        return alpha * x0 + sigma * torch.randn(x0.shape, generator=rng), t

    @torch.no_grad()
    def x0(self, x_t: torch.Tensor, t: torch.Tensor, prompt: torch.Tensor,
           unet: UNet2DConditionModel | None = None) -> torch.Tensor:
        """The teacher's CFG x0-prediction (2 NFE a sample); ``unet`` replaces the teacher's UNet (a node of
        DisBack's degradation path, guided the same way)."""
        n = x_t.shape[0]
        cond = torch.cat([self.cond[prompt], self.uncond.expand(n, -1, -1)])
        unet = unet if unet is not None else self.unet
        eps_c, eps_u = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), encoder_hidden_states=cond).sample.chunk(2)
        return self.x0_from_eps(x_t, eps_u + self.guidance_scale * (eps_c - eps_u), t)

    def cond_x0(self, unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """A score UNet's conditional x0-prediction (no guidance: the fake scores and DisBack's degraded copies)."""
        return self.x0_from_eps(x_t, unet(x_t, t, encoder_hidden_states=self.cond[prompt]).sample, t)

    def x0_from_eps(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``(x_t − σ_t ε) / α_t`` on the teacher's schedule."""
        alpha, sigma = self.alpha_sigma(t)
        return (x_t - sigma * eps) / alpha

    def student_x0(self, student: nn.Module, z: torch.Tensor, prompt: torch.Tensor,
                   prediction: str = "epsilon") -> torch.Tensor:
        """The one-step student's sample at t = 999 (DDIM's one trailing step): its output itself with
        ``prediction="sample"``, or its eps turned into ``x0 = (z − σ_T ε) / α_T`` with ``"epsilon"``."""
        t = torch.full((z.shape[0],), STUDENT_TIMESTEP, dtype=torch.long)
        out = student(z, t, encoder_hidden_states=self.cond[prompt]).sample
        if prediction == "sample":
            return out
        if prediction != "epsilon":
            raise ValueError(f"prediction: 'epsilon' or 'sample', got {prediction!r}")
        return self.x0_from_eps(z, out, t)

    @torch.no_grad()
    def ode_pairs(self, count: int, seed: int, steps: int = 25, batch_size: int = 128,
                  progress: bool = False) -> dict[str, torch.Tensor]:
        """``count`` teacher samples: noise ``z``, prompt index (i % 196) and the x0 latents the teacher's quality
        strategy reaches from z in ``steps`` steps, through the engine's one loop."""
        rng = torch.Generator().manual_seed(seed)
        z = torch.randn(count, *self.latent_shape, generator=rng)
        prompt = torch.arange(count) % len(self.prompts)
        out = []
        for start in range(0, count, batch_size):
            rows = slice(start, start + batch_size)
            prepared = prepare_strategy(self.loaded.spec, Strategy.parse(TEACHER_STRATEGY), steps)
            scheduler = prepared.sampler.make_scheduler(self.loaded.scheduler_config,
                                                        prepared.schedule.scheduler_options())
            prepared.schedule.set_timesteps(scheduler, steps, self.loaded.device)
            prepared.guidance.begin(None)
            conditioning = self.loaded.prompt_encoder.conditioning(
                [self.prompts[i] for i in prompt[rows].tolist()], None, prepared.guidance.needs_uncond, None)
            out.append(denoise(self.unet, z[rows] * scheduler.init_noise_sigma, scheduler, scheduler.timesteps,
                               prepared.guidance, conditioning, step_kwargs=prepared.sampler.step_kwargs()))
            if progress:
                print(f"teacher pairs {min(start + batch_size, count)}/{count}", flush=True)
        return {"z": z, "prompt": prompt, "x0": torch.cat(out).float()}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, vae: Any = None) -> np.ndarray:
        """Latents -> uint8 NHWC images (the pipeline's VAE, or ``vae``)."""
        vae = vae if vae is not None else self.vae
        pixels = vae.decode(latents / vae.config.scaling_factor).sample
        return to_uint8_nhwc((pixels.clamp(-1, 1) + 1) / 2)

    @torch.no_grad()
    def evaluate(self, student: nn.Module, seed: int = 0, judge: ShapesJudge | None = None,
                 batch_size: int = 98, prediction: str = "epsilon", vae: Any = None) -> dict[str, Any]:
        """Prompt accuracy (the project's judge) of one 1-step image per prompt, seed ``seed + i`` for prompt i:
        the engine's noise for the same seeds (``evaluate_shapes``), never the noise of the teacher pairs (one
        generator seeded with the run's seed draws all of those)."""
        judge = judge or ShapesJudge.load()
        z = torch.cat([torch.randn((1, *self.latent_shape), generator=torch.Generator().manual_seed(seed + i))
                       for i in range(len(self.prompts))])
        prompt = torch.arange(len(self.prompts))
        images = np.concatenate([
            self.decode(self.student_x0(student, z[i:i + batch_size], prompt[i:i + batch_size], prediction), vae)
            for i in range(0, len(prompt), batch_size)])
        accuracy = judge.prompt_accuracy(images, self.prompts)
        out_of_gamut = float(((images < 10) | (images > 250)).mean())
        return {"prompt_accuracy": accuracy["all"], "shape": accuracy["shape"], "color": accuracy["color"],
                "background": accuracy["background"], "out_of_gamut": round(out_of_gamut, 5)}


def _betas(config: dict[str, Any]) -> torch.Tensor:
    start, end, n = float(config["beta_start"]), float(config["beta_end"]), int(config["num_train_timesteps"])
    if config.get("beta_schedule") == "scaled_linear":
        return torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float64) ** 2
    if config.get("beta_schedule") == "linear":
        return torch.linspace(start, end, n, dtype=torch.float64)
    raise ValueError(f"beta_schedule: {config.get('beta_schedule')!r} is not supported by the shapes teacher")


class ShapesRegression(NoExtraState):
    """DMD's regression loss alone: a copy of the teacher UNet regresses the teacher's ODE pairs (MSE in latent
    space) in one step at t = 999, with Adam at ``lr`` or, with ``schedule="cosine"``, at a rate falling from ``lr``
    to ``lr_end`` along a half cosine over ``iterations``.
    The initial student G0 of DisBack's shapes recipe (for :func:`trainer.train`)."""

    def __init__(self, teacher: ShapesTeacher, pairs: dict[str, torch.Tensor], *, iterations: int,
                 batch_size: int = 32, lr: float = 3e-4, lr_end: float = 1e-5, schedule: str = "cosine",
                 grad_clip: float = 1.0) -> None:
        if schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule: 'constant' or 'cosine', got {schedule!r}")
        self.config: dict[str, Any] = {"iterations": iterations, "batch_size": batch_size, "lr": lr,
                                       "lr_end": lr_end, "schedule": schedule, "grad_clip": grad_clip,
                                       "pairs": int(pairs["z"].shape[0])}
        self.teacher, self.pairs = teacher, pairs
        self.iterations, self.batch_size, self.lr, self.lr_end = iterations, batch_size, lr, lr_end
        self.schedule, self.grad_clip = schedule, grad_clip
        self.student = copy.deepcopy(teacher.unet).requires_grad_(True).train()
        self.optimizer = torch.optim.Adam(self.student.parameters(), lr=lr, betas=(0.9, 0.99))

    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"student": self.optimizer}

    def train_step(self, iteration: int, rng: torch.Generator) -> dict[str, float]:
        if self.schedule == "cosine":
            set_cosine_lr(self.optimizer, iteration, self.iterations, self.lr, self.lr_end)
        loss = regression_loss(self.teacher, self.student, self.pairs, self.batch_size, rng)
        optimizer_step(self.optimizer, loss, self.student, self.grad_clip)
        return {"student_updated": 1.0, "loss_reg": float(loss.detach())}


def regression_loss(teacher: ShapesTeacher, student: nn.Module, pairs: dict[str, torch.Tensor], batch_size: int,
                    rng: torch.Generator) -> torch.Tensor:
    """MSE between the student's one-step samples and the teacher's ODE endpoints of ``batch_size`` random pairs."""
    rows = torch.randint(0, pairs["z"].shape[0], (batch_size,), generator=rng)
    x = teacher.student_x0(student, pairs["z"][rows], pairs["prompt"][rows])
    return F.mse_loss(x, pairs["x0"][rows])


def set_cosine_lr(optimizer: torch.optim.Optimizer, iteration: int, iterations: int, start: float,
                  end: float) -> None:
    """The learning rate at ``iteration`` of a half cosine from ``start`` to ``end`` over ``iterations``."""
    cosine = 0.5 * (1 + math.cos(math.pi * min(iteration / max(iterations, 1), 1.0)))
    for group in optimizer.param_groups:
        group["lr"] = end + (start - end) * cosine


class MidFeatures(nn.Module):
    """The UNet's x0-prediction together with its mid-block output (the discriminator's features)."""

    def __init__(self, unet: UNet2DConditionModel, teacher: ShapesTeacher) -> None:
        super().__init__()
        self.unet = unet
        self.teacher = teacher
        self._mid: torch.Tensor | None = None
        unet.mid_block.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self._mid = output

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = self.teacher.cond_x0(self.unet, x_t, t, prompt)
        mid, self._mid = self._mid, None
        assert mid is not None
        return x0, mid.flatten(1)


class ShapesFDistill(NoExtraState):
    """f-distill with DMD's regression loss on a :class:`ShapesTeacher` (for :func:`trainer.train`).

    Iterations ``< regression_iterations``: the student regresses the teacher's ODE pairs (MSE in latent
    space) at ``lr_regression``, or, with ``regression_schedule="cosine"``, at a learning rate that falls from
    ``lr_regression`` to ``lr_student`` along a half cosine over that phase. Afterwards, the DMD2
    two-time-scale loop of ``fdistill.FDistill``: every ``student_update_freq``-th iteration the student
    (h-weighted distribution matching + ``regression_weight`` × regression + a small GAN term), otherwise the
    fake score (denoising score matching on student samples) and the discriminator
    (real = noised teacher samples, fake = noised student samples).
    """

    def __init__(self, teacher: ShapesTeacher, pairs: dict[str, torch.Tensor], *, divergence: str = "js",
                 batch_size: int = 32, regression_iterations: int = 1000, regression_weight: float = 1.0,
                 student_update_freq: int = 5, lr_student: float = 1e-4, lr_regression: float = 3e-4,
                 lr_fake: float = 1e-4, lr_discriminator: float = 1e-4, betas: tuple[float, float] = (0.0, 0.99),
                 gan_weight: float = 1e-3, grad_clip: float = 1.0, bins: int = 10, init_seed: int = 0,
                 regression_schedule: str = "constant") -> None:
        if regression_schedule not in ("constant", "cosine"):
            raise ValueError(f"regression_schedule: 'constant' or 'cosine', got {regression_schedule!r}")
        self.config: dict[str, Any] = {
            "divergence": divergence, "batch_size": batch_size, "regression_iterations": regression_iterations,
            "regression_weight": regression_weight, "student_update_freq": student_update_freq,
            "lr_student": lr_student, "lr_regression": lr_regression, "lr_fake": lr_fake,
            "lr_discriminator": lr_discriminator, "betas": list(betas), "gan_weight": gan_weight,
            "grad_clip": grad_clip, "bins": bins, "init_seed": init_seed, "pairs": int(pairs["z"].shape[0]),
            "regression_schedule": regression_schedule,
        }
        self.regression_schedule = regression_schedule
        self.lr_regression = lr_regression
        self.teacher = teacher
        self.pairs = pairs
        self.batch_size = batch_size
        self.regression_iterations = regression_iterations
        self.regression_weight = regression_weight
        self.student_update_freq = student_update_freq
        self.gan_weight = gan_weight
        self.grad_clip = grad_clip
        self.lr_student = lr_student
        self.student = copy.deepcopy(teacher.unet).requires_grad_(True).train()
        self.fake_unet = copy.deepcopy(teacher.unet).requires_grad_(True).train()
        self.fake_score = MidFeatures(self.fake_unet, teacher)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            mid = int(teacher.unet.config.block_out_channels[-1]) * (teacher.latent_shape[1] // 2) ** 2
            self.discriminator = DiscriminatorHead(mid, 128, 1)
        self.weight = FDivWeight(divergence, teacher.t_min, teacher.t_max, bins)
        self._optimizers = {
            "student": torch.optim.Adam(self.student.parameters(), lr=lr_regression, betas=(0.9, 0.99)),
            "fake_score": torch.optim.Adam(self.fake_unet.parameters(), lr=lr_fake, betas=betas),
            "discriminator": torch.optim.Adam(self.discriminator.parameters(), lr=lr_discriminator, betas=betas),
        }

    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.student, "fake_score": self.fake_unet, "discriminator": self.discriminator,
                "weight": self.weight}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self._optimizers

    def _regression(self, rng: torch.Generator) -> torch.Tensor:
        return regression_loss(self.teacher, self.student, self.pairs, self.batch_size, rng)

    def train_step(self, iteration: int, rng: torch.Generator) -> dict[str, float]:
        if iteration < self.regression_iterations:
            if self.regression_schedule == "cosine":
                set_cosine_lr(self._optimizers["student"], iteration, self.regression_iterations, self.lr_regression,
                              self.lr_student)
            loss = self._regression(rng)
            optimizer_step(self._optimizers["student"], loss, self.student, self.grad_clip)
            return {"student_updated": 1.0, "loss_reg": float(loss.detach())}
        if iteration == self.regression_iterations:  # the distribution-matching phase's own learning rate
            for group in self._optimizers["student"].param_groups:
                group["lr"] = self.lr_student
        z = torch.randn(self.batch_size, *self.teacher.latent_shape, generator=rng)
        prompt = self.teacher.sample_prompts(self.batch_size, rng)
        if (iteration - self.regression_iterations) % self.student_update_freq == 0:
            return self._student_step(z, prompt, rng)
        return self._critic_step(z, prompt, rng)

    def _student_step(self, z: torch.Tensor, prompt: torch.Tensor, rng: torch.Generator) -> dict[str, float]:
        x = self.teacher.student_x0(self.student, z, prompt)
        x_t, t = self.teacher.noised(x, rng)
        self.fake_unet.requires_grad_(False)
        self.discriminator.requires_grad_(False)
        try:
            fake_x0, features = self.fake_score(x_t if self.gan_weight else x_t.detach(), t, prompt)
            logits = self.discriminator(features)
        finally:
            self.fake_unet.requires_grad_(True)
            self.discriminator.requires_grad_(True)
        with torch.no_grad():
            teacher_x0 = self.teacher.x0(x_t.detach(), t, prompt)
            weights = self.weight(logits.detach(), t)
            grad = generator_gradient(weights, x.detach(), teacher_x0, fake_x0.detach())
        loss_f = 0.5 * F.mse_loss(x, (x - grad).detach())
        loss_gan = F.softplus(-logits).mean()
        loss_reg = self._regression(rng)
        loss = loss_f + self.regression_weight * loss_reg + self.gan_weight * loss_gan
        optimizer_step(self._optimizers["student"], loss, self.student, self.grad_clip)
        return {"student_updated": 1.0, "loss_f": float(loss_f.detach()), "loss_reg": float(loss_reg.detach()),
                "h_min": float(weights.min()), "h_max": float(weights.max())}

    def _critic_step(self, z: torch.Tensor, prompt: torch.Tensor, rng: torch.Generator) -> dict[str, float]:
        with torch.no_grad():
            x = self.teacher.student_x0(self.student, z, prompt)
        x_t, t = self.teacher.noised(x, rng)
        fake_x0, features_fake = self.fake_score(x_t, t, prompt)
        loss_dsm = F.mse_loss(fake_x0, x)
        optimizer_step(self._optimizers["fake_score"], loss_dsm, self.fake_unet, self.grad_clip)
        rows = torch.randint(0, self.pairs["z"].shape[0], (self.batch_size,), generator=rng)
        real_t, t_real = self.teacher.noised(self.pairs["x0"][rows], rng)
        with torch.no_grad():
            _, features_real = self.fake_score(real_t, t_real, self.pairs["prompt"][rows])
        logits = self.discriminator(torch.cat([features_fake.detach(), features_real]))
        fake_logits, real_logits = logits.chunk(2)
        loss_d = (F.softplus(fake_logits) + F.softplus(-real_logits)).mean()
        optimizer_step(self._optimizers["discriminator"], loss_d, self.discriminator, self.grad_clip)
        return {"loss_dsm": float(loss_dsm.detach()), "loss_disc": float(loss_d.detach())}
