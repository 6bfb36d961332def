"""f-distill: one-step distillation by f-divergence distribution matching (Xu, Nie, Vahdat, arXiv 2502.15681).

Spec: ``specs/students-parallel-stream.md`` §1. The generator gradient of ``D_f(p_t || q_t)`` is

    ∇_θ D_f = −E[ h(r(x_t)) · (s_p(x_t) − s_q(x_t))ᵀ ∂x_t/∂θ ],   h(r) = r² f''(r),   r = p_t / q_t,

i.e. DMD's score difference weighted per sample. Reverse KL (h ≡ 1) is DMD itself. Here:

- :data:`DIVERGENCES`: f and h for reverse-KL, softened RKL, Jensen–Shannon, squared Hellinger, forward-KL,
  Jeffreys and Neyman χ² (h up to the constant in :data:`H_SCALE`, which the normalization removes);
- :class:`FDivWeight`: the two-stage weight normalization (§1.4): logits → clamped r → per-timestep-bin
  mean normalization (an EMA buffer, saved with the student) → h(r) → divided by its batch mean;
- :class:`FDistill`: the DMD2 two-time-scale iteration (§1.6) for :func:`accel_diffusion.students.trainer.train`:
  the student every ``student_update_freq`` iterations (VSD pseudo-target loss with the DMD normalizer and
  the weight h, plus a small non-saturating GAN term), otherwise the fake score (denoising score matching
  on student samples, x0 space) and the discriminator, a head on the fake score network's features whose
  logit estimates log r (real = noised data, fake = noised student samples).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from accel_diffusion.students.networks import DiscriminatorHead, MlpDenoiser, MlpGenerator
from accel_diffusion.students.teachers import Teacher, noised
from accel_diffusion.students.trainer import NoExtraState, optimizer_step


def _f_rkl(r: torch.Tensor) -> torch.Tensor:
    return -torch.log(r)


def _f_sf(r: torch.Tensor) -> torch.Tensor:
    return (r + 1) * torch.log((1 + r) / (2 * r))


def _f_js(r: torch.Tensor) -> torch.Tensor:
    return r * torch.log(r) - (r + 1) * torch.log((r + 1) / 2)


def _f_sh(r: torch.Tensor) -> torch.Tensor:
    return (torch.sqrt(r) - 1) ** 2


def _f_kl(r: torch.Tensor) -> torch.Tensor:
    return r * torch.log(r)


def _f_jf(r: torch.Tensor) -> torch.Tensor:
    return (r - 1) * torch.log(r)


def _f_neyman(r: torch.Tensor) -> torch.Tensor:
    return (1 - r) ** 2 / r


DIVERGENCES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "rkl": (_f_rkl, torch.ones_like),
    "sf": (_f_sf, lambda r: 1 / (1 + r)),
    "js": (_f_js, lambda r: r / (1 + r)),
    "sh": (_f_sh, torch.sqrt),
    "kl": (_f_kl, lambda r: r),
    "jf": (_f_jf, lambda r: 1 + r),
    "neyman": (_f_neyman, lambda r: 1 / r.clamp(min=1e-8)),
}
"""name -> (f(r), h(r)): reverse-KL (= DMD), softened RKL, Jensen–Shannon, squared Hellinger, forward-KL,
Jeffreys, Neyman χ² (the FastGen keys of spec §1.2)."""

H_SCALE = {"rkl": 1.0, "sf": 1.0, "js": 1.0, "sh": 0.5, "kl": 1.0, "jf": 1.0, "neyman": 2.0}
"""r² f''(r) = H_SCALE[name] · h(r): the constant dropped from h (the mean normalization removes it)."""


def f_divergence(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The convex f of divergence ``name`` (f(1) = 0)."""
    return _lookup(name)[0]


def h_weight(name: str, r: torch.Tensor) -> torch.Tensor:
    """h(r) ∝ r² f''(r) of divergence ``name`` (constant dropped, see :data:`H_SCALE`)."""
    return _lookup(name)[1](r)


def _lookup(name: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(f"divergence: unknown {name!r} (allowed: {', '.join(DIVERGENCES)})") from None


class FDivWeight(nn.Module):
    """Per-sample generator weights from discriminator logits: the two-stage normalization of spec §1.4.

    1. mean over heads, clamp to ±``logit_clamp``, r = exp, clip r to [``ratio_lower``, ``ratio_upper``];
    2. (``per_t_normalization``) split [t_min, t_max] into ``bins`` bins; each bin present in the batch
       updates its buffer ``bin ← bin_ema·bin + (1 − bin_ema)·mean(r in bin)``; r ← r / bin[t];
    3. h = h_f(r), divided by its batch mean (+1e-6): mean 1, so the loss scale is DMD's.

    Everything is float32 and detached. The bin buffer is part of the state dict (saved with the student).
    """

    def __init__(self, divergence: str = "js", t_min: float = 0.0, t_max: float = 999.0, bins: int = 10,
                 bin_ema: float = 0.0, per_t_normalization: bool = True, ratio_lower: float = 0.1,
                 ratio_upper: float = 20.0, logit_clamp: float = 10.0) -> None:
        super().__init__()
        _lookup(divergence)
        if not t_max > t_min:
            raise ValueError(f"t_max: must exceed t_min, got [{t_min}, {t_max}]")
        if not 0 < ratio_lower < ratio_upper:
            raise ValueError(f"ratio_lower/ratio_upper: need 0 < lower < upper, got {ratio_lower}, {ratio_upper}")
        if not 0.0 <= bin_ema < 1.0:
            raise ValueError(f"bin_ema: must lie in [0, 1), got {bin_ema}")
        self.divergence = divergence
        self.t_min, self.t_max, self.num_bins, self.bin_ema = t_min, t_max, bins, bin_ema
        self.per_t_normalization = per_t_normalization
        self.ratio_lower, self.ratio_upper, self.logit_clamp = ratio_lower, ratio_upper, logit_clamp
        self.register_buffer("bin_means", torch.ones(bins, dtype=torch.float32))

    def bin_index(self, t: torch.Tensor) -> torch.Tensor:
        frac = (t.float() - self.t_min) / (self.t_max - self.t_min)
        return (frac * self.num_bins).long().clamp(0, self.num_bins - 1)

    def ratio(self, logits: torch.Tensor, t: torch.Tensor, update: bool = True) -> torch.Tensor:
        """Stages 1–2: the (per-bin normalized) density ratio r, (B,)."""
        logit = logits.detach().float().reshape(logits.shape[0], -1).mean(1).clamp(-self.logit_clamp,
                                                                                     self.logit_clamp)
        r = torch.exp(logit).clamp(self.ratio_lower, self.ratio_upper)
        if not self.per_t_normalization:
            return r
        index = self.bin_index(t.reshape(-1))
        if update:
            sums = torch.zeros(self.num_bins).index_add_(0, index, r)
            counts = torch.zeros(self.num_bins).index_add_(0, index, torch.ones_like(r))
            present = counts > 0
            batch_mean = sums[present] / counts[present]
            self.bin_means[present] = self.bin_ema * self.bin_means[present] + (1 - self.bin_ema) * batch_mean
        return r / self.bin_means[index]

    def forward(self, logits: torch.Tensor, t: torch.Tensor, update: bool = True) -> torch.Tensor:
        """Weights (B,) with mean 1 (stage 3 on top of :meth:`ratio`)."""
        h = h_weight(self.divergence, self.ratio(logits, t, update))
        return h / (h.mean() + 1e-6)


def generator_gradient(weights: torch.Tensor, x0: torch.Tensor, teacher_x0: torch.Tensor, fake_x0: torch.Tensor,
                       dmd_normalizer: bool = True) -> torch.Tensor:
    """The per-sample gradient g (B, D) that the student's loss ½|x − sg(x − g)|² applies to its sample x0 (§1.5).

    ``g = h · w · (D_fake − D_teacher)`` with DMD's normalizer ``w = 1 / (mean|x0 − D_teacher| + 1e-6)``
    (``dmd_normalizer=False``: w = 1). By Tweedie, ``s_p − s_q = (α/σ²)(D_teacher − D_fake)``, so descending
    along g moves x0 along ``+h (s_p − s_q)``: the f-divergence gradient of the module docstring.
    """
    diff = fake_x0 - teacher_x0
    if dmd_normalizer:
        diff = diff / ((x0 - teacher_x0).abs().flatten(1).mean(1).reshape(-1, *[1] * (x0.dim() - 1)) + 1e-6)
    return weights.reshape(-1, *[1] * (x0.dim() - 1)) * diff


class FDistill(NoExtraState):
    """f-distill on a :class:`~accel_diffusion.students.teachers.Teacher` (spec §1.5–1.6).

    Networks: the one-step ``student`` G(z), the ``fake_score`` x0-denoiser of the student's distribution,
    and the ``discriminator`` head on ``fake_score.features``. Iteration k updates the student when
    ``k % student_update_freq == 0``, else the fake score (DSM) and the discriminator (GAN loss). The first
    ``warmup_iterations`` iterations update only the critics (the gmm teacher has no weights to initialize
    the fake score from, so it is fitted to the initial student first). All constructor arguments but the
    teacher are JSON values: :attr:`config` records them for the model card. A resume needs no extra state: the
    ratio bins are a buffer of the ``weight`` module.
    """

    def __init__(self, teacher: Teacher, *, divergence: str = "js", batch_size: int = 256, hidden: int = 128,
                 layers: int = 3, student_update_freq: int = 5, warmup_iterations: int = 200,
                 lr_student: float = 1e-4, lr_fake: float = 1e-3, lr_discriminator: float = 1e-3,
                 betas: tuple[float, float] = (0.0, 0.99), gan_weight: float = 1e-3, grad_clip: float = 1.0,
                 bins: int = 10, bin_ema: float = 0.0, per_t_normalization: bool = True,
                 ratio_lower: float = 0.1, ratio_upper: float = 20.0, discriminator_heads: int = 1,
                 init_seed: int = 0) -> None:
        if student_update_freq < 1:
            raise ValueError(f"student_update_freq: must be >= 1, got {student_update_freq}")
        self.config: dict[str, Any] = {
            "divergence": divergence, "batch_size": batch_size, "hidden": hidden, "layers": layers,
            "student_update_freq": student_update_freq, "warmup_iterations": warmup_iterations,
            "lr_student": lr_student, "lr_fake": lr_fake, "lr_discriminator": lr_discriminator,
            "betas": list(betas), "gan_weight": gan_weight, "grad_clip": grad_clip, "bins": bins,
            "bin_ema": bin_ema, "per_t_normalization": per_t_normalization, "ratio_lower": ratio_lower,
            "ratio_upper": ratio_upper, "discriminator_heads": discriminator_heads, "init_seed": init_seed,
        }
        self.teacher = teacher
        self.batch_size = batch_size
        self.student_update_freq = student_update_freq
        self.warmup_iterations = warmup_iterations
        self.gan_weight = gan_weight
        self.grad_clip = grad_clip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.student = MlpGenerator(dim=teacher.dim, hidden=hidden, layers=layers,
                                        timestep=teacher.num_train_timesteps - 1)
            self.fake_score = MlpDenoiser(dim=teacher.dim, hidden=hidden, layers=layers,
                                          num_train_timesteps=teacher.num_train_timesteps)
            self.discriminator = DiscriminatorHead(self.fake_score.feature_dim, hidden, discriminator_heads)
        self.weight = FDivWeight(divergence, teacher.t_min, teacher.t_max, bins, bin_ema, per_t_normalization,
                                 ratio_lower, ratio_upper)
        self._optimizers = {
            "student": torch.optim.Adam(self.student.parameters(), lr=lr_student, betas=betas, foreach=True),
            "fake_score": torch.optim.Adam(self.fake_score.parameters(), lr=lr_fake, betas=betas, foreach=True),
            "discriminator": torch.optim.Adam(self.discriminator.parameters(), lr=lr_discriminator, betas=betas,
                                              foreach=True),
        }
        self.last_weights: torch.Tensor | None = None

    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.student, "fake_score": self.fake_score, "discriminator": self.discriminator,
                "weight": self.weight}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self._optimizers


    def _noised(self, x0: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return noised(self.teacher, x0, rng)

    def _step(self, name: str, loss: torch.Tensor, module: nn.Module) -> None:
        optimizer_step(self._optimizers[name], loss, module, self.grad_clip)

    def train_step(self, iteration: int, rng: torch.Generator) -> dict[str, float]:
        z = torch.randn(self.batch_size, self.teacher.dim, generator=rng)
        if iteration >= self.warmup_iterations and iteration % self.student_update_freq == 0:
            return self._student_step(z, rng)
        return self._critic_step(z, rng)

    def _student_step(self, z: torch.Tensor, rng: torch.Generator) -> dict[str, float]:
        x = self.student(z).sample
        x_t, t = self._noised(x, rng)
        self.fake_score.requires_grad_(False)
        self.discriminator.requires_grad_(False)
        try:  # one pass of the frozen critics; only the GAN term differentiates through it (into x)
            features = self.fake_score.features(x_t if self.gan_weight else x_t.detach(), t)
            logits = self.discriminator(features)
        finally:
            self.fake_score.requires_grad_(True)
            self.discriminator.requires_grad_(True)
        with torch.no_grad():
            teacher_x0 = self.teacher.x0(x_t, t)
            fake_x0 = self.fake_score.head(features.detach())
            weights = self.weight(logits.detach(), t)
            grad = generator_gradient(weights, x.detach(), teacher_x0, fake_x0)
        self.last_weights = weights
        loss_f = 0.5 * F.mse_loss(x, (x - grad).detach())
        loss_gan = F.softplus(-logits).mean()
        loss = loss_f + self.gan_weight * loss_gan if self.gan_weight else loss_f
        self._step("student", loss, self.student)
        return {"student_updated": 1.0, "loss_f": float(loss_f.detach()), "loss_gan_gen": float(loss_gan.detach()),
                "h_min": float(weights.min()), "h_max": float(weights.max())}

    def _critic_step(self, z: torch.Tensor, rng: torch.Generator) -> dict[str, float]:
        with torch.no_grad():
            x = self.student(z).sample
        x_t, t = self._noised(x, rng)
        features_fake = self.fake_score.features(x_t, t)
        loss_dsm = F.mse_loss(self.fake_score.head(features_fake), x)
        self._step("fake_score", loss_dsm, self.fake_score)
        real = self.teacher.sample_data(self.batch_size, rng)
        real_t, t_real = self._noised(real, rng)
        with torch.no_grad():  # the head reads the fake score's features; its loss does not train them
            feats_real = self.fake_score.features(real_t, t_real)
        logits = self.discriminator(torch.cat([features_fake.detach(), feats_real]))
        fake_logits, real_logits = logits.chunk(2)
        loss_d = (F.softplus(fake_logits) + F.softplus(-real_logits)).mean()
        self._step("discriminator", loss_d, self.discriminator)
        return {"loss_dsm": float(loss_dsm.detach()), "loss_disc": float(loss_d.detach())}


def divergence_names() -> list[str]:
    """The divergence keys :class:`FDistill` accepts."""
    return list(DIVERGENCES)


