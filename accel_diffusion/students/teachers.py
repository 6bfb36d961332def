"""Teachers of distillation: what a student method asks of the model it learns from.

A :class:`Teacher` gives the exact or learned x0-prediction at continuous timesteps, the VP schedule
(α, σ), the timestep range students train on, and samples of the data (the "real" side of f-distill's
discriminator). :class:`GmmTeacher` is the analytic ``gmm`` oracle (exact x0, exact data).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import nn

from accel_diffusion.eval.gmm_metrics import mmd_rbf, mode_weights
from accel_diffusion.models.gmm import GmmDenoiser, load_gmm_pipeline


class Teacher(Protocol):
    dim: int
    t_min: float
    t_max: float
    num_train_timesteps: int

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α, σ), each (B, 1) float32, at timesteps t (B,)."""

    def x0(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The teacher's x0-prediction (B, D) float32 at noisy samples x_t and timesteps t."""

    def sample_timesteps(self, n: int, rng: torch.Generator) -> torch.Tensor:
        """n training timesteps, uniform on [t_min, t_max] (float32)."""

    def sample_data(self, n: int, rng: torch.Generator) -> torch.Tensor:
        """n samples of the data (float32)."""


def noised(teacher: Teacher, x0: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, t): ``x0`` diffused to timesteps drawn uniformly from the teacher's training range."""
    t = teacher.sample_timesteps(x0.shape[0], rng)
    alpha, sigma = teacher.alpha_sigma(t)
    return alpha * x0 + sigma * torch.randn(x0.shape, generator=rng), t


class GmmTeacher:
    """The ``gmm`` oracle as a teacher: its exact denoiser at continuous timesteps in [t_min, t_max]."""

    def __init__(self, denoiser: GmmDenoiser | None = None, t_min: float = 20.0, t_max: float = 980.0) -> None:
        self.denoiser = denoiser if denoiser is not None else load_gmm_pipeline().denoiser
        self.mixture = self.denoiser.mixture
        self.dim = self.mixture.dim
        self.num_train_timesteps = int(self.denoiser.config.num_train_timesteps)
        if not 0 <= t_min < t_max <= self.num_train_timesteps - 1:
            raise ValueError(f"t_min/t_max: need 0 <= t_min < t_max <= {self.num_train_timesteps - 1}, "
                             f"got {t_min}, {t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = self.denoiser.alpha_sigma(t.detach().double())
        return alpha.float().reshape(-1, 1), sigma.float().reshape(-1, 1)

    def x0(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.denoiser.alpha_sigma(t.detach().double())
        x = x_t.detach().double()
        eps = self.mixture.eps(x, alpha, sigma)
        return ((x - sigma.reshape(-1, 1) * eps) / alpha.reshape(-1, 1)).float()

    def sample_timesteps(self, n: int, rng: torch.Generator) -> torch.Tensor:
        return self.t_min + (self.t_max - self.t_min) * torch.rand(n, generator=rng)

    def sample_data(self, n: int, rng: torch.Generator) -> torch.Tensor:
        return self.mixture.sample(n, generator=rng).float()

    def evaluate(self, student: nn.Module, n: int = 2000, seed: int = 1234) -> dict[str, float | list[float]]:
        """MMD² to exact mixture samples, mode weights and their max error, of ``n`` one-step samples.

        Its own seeded generators: evaluating never changes a training run's random numbers.
        """
        rng = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.dim, generator=rng)
        with torch.no_grad():
            x = student(z).sample.double()
        reference = self.mixture.sample(n, generator=rng)
        weights = mode_weights(x, self.mixture)
        return {
            "mmd": float(mmd_rbf(x, reference)),
            "mode_weights": [round(float(w), 4) for w in weights],
            "mode_weight_error": float(np.max(np.abs(weights - self.mixture.weights.numpy()))),
        }
