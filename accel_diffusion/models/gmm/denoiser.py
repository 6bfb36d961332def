"""``GmmDenoiser``: the exact mixture denoiser as a diffusers model, called like a UNet."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import BaseOutput

from accel_diffusion.models.gmm.mixture import ArrayLike, GaussianMixture, _to_tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("scaled_linear", "linear")


def discrete_alphas_cumprod(
    num_train_timesteps: int, beta_schedule: str, beta_start: float, beta_end: float
) -> torch.Tensor:
    """ᾱ_t exactly as diffusers' schedulers compute it (float32 betas and cumprod), as float64."""
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    else:
        raise ValueError(f"beta_schedule: unsupported {beta_schedule!r} (allowed: {', '.join(BETA_SCHEDULES)})")
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float64)


@dataclass
class GmmDenoiserOutput(BaseOutput):
    """Output of :class:`GmmDenoiser`: the prediction, shaped like the input sample."""

    sample: torch.Tensor


class GmmDenoiser(ModelMixin, ConfigMixin):
    """The exact denoiser of a Gaussian mixture, called like a UNet: ``model(sample, timestep)``.

    The config holds the mixture and the discrete VP schedule (diffusers conventions) the model
    is queried on. Predictions are computed in float64 and returned in the input dtype.

    Timesteps may be integer or fractional, a scalar or one per sample. ``log ᾱ`` is interpolated
    linearly in t between integer timesteps (exact at integers, monotone; a constant β per unit
    interval), and between t = −1 (ᾱ = 1, ρ = 0) and t = 0, so t ∈ [−1, T−1] covers ρ ∈ [0, ρ_max].
    Other timesteps raise ValueError; note that DDIM's default "leading" spacing with
    steps_offset=1 asks for t = 1000 at 1000 steps (use "trailing" or "linspace" there).

    ``class_labels`` (optional) conditions on one mixture component: an exact conditional model
    for guidance tests (the unconditional model is the full mixture).

    The mixture tensors are also kept as float64 buffers so the model saves as safetensors;
    computation always uses the float64 mixture built from the config, so casting the model to
    another dtype does not change its outputs.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        weights: Sequence[float] = (1.0,),
        means: Sequence[Sequence[float]] = ((0.0, 0.0),),
        covariances: Sequence[Sequence[Sequence[float]]] = (((1.0, 0.0), (0.0, 1.0)),),
        num_train_timesteps: int = 1000,
        beta_schedule: str = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        prediction_type: str = "epsilon",
    ) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type: unsupported {prediction_type!r} (allowed: {', '.join(PREDICTION_TYPES)})"
            )
        self.mixture = GaussianMixture(weights, means, covariances)
        self._log_acp = torch.log(discrete_alphas_cumprod(num_train_timesteps, beta_schedule, beta_start, beta_end))
        self.register_buffer("mixture_weights", self.mixture.weights.clone())
        self.register_buffer("mixture_means", self.mixture.means.clone())
        self.register_buffer("mixture_covariances", self.mixture.covariances.clone())

    @classmethod
    def from_mixture(cls, mixture: GaussianMixture, **schedule: Any) -> GmmDenoiser:
        """Build a denoiser for ``mixture``; ``schedule`` takes the other config fields."""
        return cls(**mixture.to_config(), **schedule)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ at the integer training timesteps, float64 (T,), identical to the scheduler's values."""
        return torch.exp(self._log_acp)

    @property
    def rho_max(self) -> float:
        """ρ at the largest training timestep."""
        return float(self.timestep_to_rho(self.config.num_train_timesteps - 1))

    def alpha_sigma(self, timestep: torch.Tensor | float | int) -> tuple[torch.Tensor, torch.Tensor]:
        """(α, σ) at (possibly fractional) timesteps in [−1, T−1], float64 tensors."""
        t = _to_tensor(timestep, torch.device("cpu")).reshape(-1)
        t_max = self.config.num_train_timesteps - 1
        if bool(((t < -1) | (t > t_max)).any()):
            raise ValueError(f"timestep: values must lie in [-1, {t_max}], got {t.tolist()}")
        grid = torch.cat([torch.zeros(1, dtype=torch.float64), self._log_acp])  # log ᾱ at t = -1, 0, ...
        u = t + 1.0
        i0 = torch.floor(u).long()  # integer timesteps give frac = 0: exactly the scheduler's ᾱ
        frac = u - i0.to(torch.float64)
        i1 = torch.clamp(i0 + 1, max=t_max + 1)
        log_acp = grid[i0] + frac * (grid[i1] - grid[i0])
        alpha = torch.exp(0.5 * log_acp)
        sigma = torch.sqrt(-torch.expm1(log_acp)) + 0.0  # + 0.0 turns -0.0 into 0.0
        return alpha, sigma

    def timestep_to_rho(self, timestep: torch.Tensor | float | int) -> torch.Tensor:
        """ρ = σ/α at (possibly fractional) timesteps, float64."""
        alpha, sigma = self.alpha_sigma(timestep)
        return sigma / alpha

    def rho_to_timestep(self, rho: torch.Tensor | float) -> torch.Tensor:
        """Inverse of :meth:`timestep_to_rho` on [0, ρ_max] (exact for the piecewise-linear log ᾱ)."""
        r = _to_tensor(rho, torch.device("cpu")).reshape(-1)
        if bool(((r < 0) | (r > self.rho_max * (1 + 1e-12))).any()):
            raise ValueError(f"rho: values must lie in [0, {self.rho_max}], got {r.tolist()}")
        target = -torch.log1p(r * r)  # log ᾱ = -log(1 + ρ²)
        grid = torch.cat([torch.zeros(1, dtype=torch.float64), self._log_acp]).numpy()
        ts = np.arange(-1, grid.shape[0] - 1, dtype=np.float64)
        return torch.from_numpy(np.interp(-target.numpy(), -grid, ts))

    def eps_at_rho(self, x: ArrayLike, rho: Any, component: Any = None) -> ArrayLike:
        """Exact ε̂ at continuous noise level ρ (independent of the discrete schedule)."""
        return self.mixture.eps_at_rho(x, rho, component)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> GmmDenoiserOutput | tuple[torch.Tensor]:
        """Predict ε, v or x0 (per ``prediction_type``) for VP samples (B, 2) at ``timestep``.

        ``encoder_hidden_states`` is accepted and ignored (UNet-style call sites). ``class_labels``
        (optional, (B,) ints) conditions on one mixture component; −1 means unconditional.
        """
        if sample.ndim != 2 or sample.shape[1] != self.mixture.dim:
            raise ValueError(f"sample: expected shape (B, {self.mixture.dim}), got {tuple(sample.shape)}")
        alpha, sigma = self.alpha_sigma(timestep)
        n = sample.shape[0]
        if alpha.numel() not in (1, n):
            raise ValueError(f"timestep: expected a scalar or {n} values, got {alpha.numel()}")
        x = sample.detach().to(torch.float64)
        alpha = alpha.to(x.device).reshape(-1, 1)
        sigma = sigma.to(x.device).reshape(-1, 1)
        comp = None if class_labels is None else class_labels.to(x.device)
        eps = self.mixture.eps(x, alpha, sigma, comp)
        pred_type = self.config.prediction_type
        if pred_type == "epsilon":
            out = eps
        elif pred_type == "sample":
            out = (x - sigma * eps) / alpha
        else:  # v_prediction: v = α ε − σ x0
            out = alpha * eps - sigma * (x - sigma * eps) / alpha
        out = out.to(sample.dtype)
        if not return_dict:
            return (out,)
        return GmmDenoiserOutput(sample=out)


def ddim_scheduler_for(denoiser: GmmDenoiser) -> DDIMScheduler:
    """A ``DDIMScheduler`` on the denoiser's schedule (clip_sample=False, steps_offset=1)."""
    cfg = denoiser.config
    return DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
