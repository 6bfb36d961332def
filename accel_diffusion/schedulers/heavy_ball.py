"""Heavy-ball (HB) momentum on a multistep solver (Wizadwongsa et al., "Diffusion Sampling with
Momentum for Mitigating Divergence Artifacts", ICLR 2024), specs/samplers.md §2.2-2.3.

A high-order multistep solver with few steps and strong guidance leaves its small stability
region and blows up into saturated "divergence artifacts". HB replaces the solver's update
direction by its exponential moving average, V <- (1 - beta) V + beta D, which enlarges the
stability region (Euler + HB: z >= -2(2 - beta)/beta on the real axis) at the price of first-order
convergence for beta < 1. beta = 1 is exactly the base solver.

Bases:

- ``dpmpp_2m``: DPM-Solver++ 2M (data prediction, "midpoint" combination D = x̂0_n + (x̂0_n -
  x̂0_{n-1}) / (2 r)); momentum on D in every second-order step, the first-order steps (the
  first, and the last ones diffusers lowers) use x̂0 as is. Same step rules as diffusers'
  ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)``, including
  ``lower_order_final`` and the first-order last step to ``final_sigmas_type="zero"``.
- ``plms``: PLMS-k in x̄ = x/α, ρ = σ/α (equal-step Adams-Bashforth weights on ε, ``plms_order``
  values); v_n = (1 - beta) v_{n-1} + beta AB_k(ε_n, ...), x̄_{n+1} = x̄_n + Δρ v_n.
  The paper's label "hb 3.8" is ``base="plms", plms_order=4, beta=0.8``.

All momentum and history are reset by ``set_timesteps``. The default grid is uniform in log-SNR
(DPM-Solver's recommendation); ``sigma_spacing=None`` uses diffusers' ``timestep_spacing`` rules.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401 (diffusers' loader looks it up here)

from accel_diffusion.schedulers.base import AB_WEIGHTS, VpSolverScheduler, _choice

HEAVY_BALL_BASES = ("dpmpp_2m", "plms")


class HeavyBallScheduler(VpSolverScheduler):
    """HB momentum (``beta``; 1 = no momentum) on DPM-Solver++ 2M or PLMS-k (``base``)."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | np.ndarray | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        sigma_spacing: str | None = "log_snr",
        use_karras_sigmas: bool = False,
        karras_rho: float = 7.0,
        final_sigmas_type: str = "zero",
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        lambda_min_clipped: float = -float("inf"),
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        variance_type: str | None = None,
        euler_at_final: bool = False,
        beta: float = 0.8,
        base: str = "dpmpp_2m",
        plms_order: int = 4,
        lower_order_final: bool = True,
    ) -> None:
        _choice("base", base, HEAVY_BALL_BASES)
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta: must be in (0, 1], got {beta}")
        if plms_order not in AB_WEIGHTS:
            raise ValueError(f"plms_order: must be one of {sorted(AB_WEIGHTS)}, got {plms_order}")
        self._init_noise_process()
        self._reset_state()

    def _reset_state(self) -> None:
        self._history: deque[torch.Tensor] = deque(maxlen=max(2, int(self.config.plms_order)))
        self._velocity: torch.Tensor | None = None
        self._steps_done = 0

    def _on_set_timesteps(self) -> None:
        self._reset_state()

    def _momentum(self, direction: torch.Tensor) -> torch.Tensor:
        beta = float(self.config.beta)
        if self._velocity is None or beta == 1.0:
            self._velocity = direction
        else:
            self._velocity = (1.0 - beta) * self._velocity + beta * direction
        return self._velocity

    def _solver_step(self, n: int, x: torch.Tensor, eps: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        if self.config.base == "plms":
            out = self._plms_step(n, x, eps)
        else:
            out = self._dpmpp_2m_step(n, x, x0)
        self._steps_done += 1
        return out

    def _plms_step(self, n: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        self._history.appendleft(eps)
        k = min(int(self.config.plms_order), len(self._history))
        weights = AB_WEIGHTS[k]
        direction = weights[0] * eps
        for j in range(1, k):
            direction = direction + weights[j] * self._history[j]
        velocity = eps if self._euler_at(n) else self._momentum(direction)  # euler_at_final: a DDIM step
        return self._xbar_step(n, x, float(self._rho[n + 1] - self._rho[n]) * velocity)

    def _dpmpp_2m_step(self, n: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        rho_s, rho_t = float(self._rho[n]), float(self._rho[n + 1])
        alpha_s, alpha_t = float(self._alpha[n]), float(self._alpha[n + 1])
        last = n == self.num_inference_steps - 1
        first_order = (
            self._steps_done < 1
            or (last and self.config.final_sigmas_type == "zero")
            or (last and self.config.lower_order_final and self.num_inference_steps < 15)
            or rho_t == 0.0
            or self._euler_at(n)
        )
        previous = self._history[0] if self._history else None
        self._history.appendleft(x0)
        if first_order:
            direction = x0
        else:
            rho_prev = float(self._rho[n - 1])
            h = np.log(rho_s / rho_t)  # λ_t - λ_s, λ = -log ρ
            r0 = np.log(rho_prev / rho_s) / h
            direction = self._momentum(x0 + (0.5 / r0) * (x0 - previous))
        # x_t = (σ_t/σ_s) x_s + α_t (1 - e^{-h}) D  with σ_t/σ_s = α_t ρ_t / (α_s ρ_s), e^{-h} = ρ_t/ρ_s
        ratio = rho_t / rho_s
        return (alpha_t * ratio / alpha_s) * x + (alpha_t * (1.0 - ratio)) * direction
