"""DEIS: the diffusion exponential integrator sampler (Zhang & Chen, ICLR 2023), four variants.

The probability-flow ODE of any VP model is exactly dx̄/dρ = ε(x, ρ) in x̄ = x/α, ρ = σ/α
(specs/samplers.md §0); the linear part is integrated exactly and ε is replaced by the Lagrange
polynomial through the current and previous ε values. One step is

    x̄_{n+1} = x̄_n + Σ_j C[n, j] ε_{n-j},   C[n, j] = ∫_{ρ_n}^{ρ_{n+1}} ℓ_j(v(ρ)) dρ

where the variant chooses the interpolation variable v:

- ``tab``: v = t, the model's timestep (the paper's main method, tAB-DEIS);
- ``rhoab``: v = ρ (plain Adams-Bashforth on dx̄/dρ = ε);
- ``logrho``: v = log ρ (diffusers' ``DEISMultistepScheduler``; same trajectories);
- ``ipndm``: the fixed equal-step Adams-Bashforth weights (1; 3/2, -1/2; ...) times Δρ
  (iPNDM: exact for equal ρ steps, an approximation otherwise).

``order`` is the number of ε values used (1-4), diffusers' convention: order 1 is DDIM for every
variant, and the DEIS reference's ``ab_order`` r (the polynomial degree) is ``order = r + 1``; its
demo setting "tAB3" is ``variant="tab", order=4``. The first steps warm up with fewer values.

Coefficients are computed once per grid in float64: closed form for ``logrho`` (also for the last
step to ρ = 0), 16-point Gauss-Legendre for ``tab`` (split where t(ρ) has kinks) and ``rhoab``
(exact). ``lower_order_final`` follows diffusers: with fewer than 15 steps, the last step uses
order 1 and the one before at most 2. ``logrho`` always takes the last step to ρ = 0 with order 1
(as DPM-Solver++ does): that step is infinitely long in log ρ, and extrapolating a polynomial in
log ρ over it lands far off once diffusers' lower_order_final stops applying (15 steps); even
diffusers' DEIS 3, whose last step to sigma_min is merely long in log ρ, is 3.5x further off the
exact endpoint at 15 NFE than at 10 on the gmm oracle (benchmarks/samplers.py).

The default grid is the paper's quadratic-t spacing (uniform in sqrt(t)); pass
``sigma_spacing=None`` for diffusers' integer ``timestep_spacing`` rules. Why it matters, measured
on the built-in ``shapes`` model (25 steps, CFG 5, order 3; benchmarks/samplers.py): on uniform-t
grids the last step is long in log-SNR (linspace: Δλ = 1.92 against a median of 0.16), and
extrapolating ε with a quadratic across it diverges under guidance: diffusers' DEIS 3 reaches
prompt accuracy 0.35-0.42 with 14-16% out-of-gamut pixels, tab 3 0.71-0.79. On quadratic-t,
log-SNR and Karras grids (last steps Δλ <= 0.53) tab 3 and logrho 3 reach 0.97-0.995.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401 (diffusers' loader looks it up here)

from accel_diffusion.schedulers.base import AB_WEIGHTS, VpSolverScheduler, _choice
from accel_diffusion.schedulers.noise_grid import gauss_points, lagrange_basis, log_rho_lagrange_integrals

DEIS_VARIANTS = ("tab", "rhoab", "logrho", "ipndm")
MAX_ORDER = 4


class DeisScheduler(VpSolverScheduler):
    """DEIS multistep sampler (``variant`` tab / rhoab / logrho / ipndm, ``order`` = ε values used)."""

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
        sigma_spacing: str | None = "quadratic_t",
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
        variant: str = "tab",
        order: int = 3,
        lower_order_final: bool = True,
    ) -> None:
        _choice("variant", variant, DEIS_VARIANTS)
        if not 1 <= int(order) <= MAX_ORDER or int(order) != order:
            raise ValueError(f"order: must be an integer in 1..{MAX_ORDER} (number of eps values), got {order}")
        self._init_noise_process()
        self._coefficients = np.zeros((0, 0, 0))
        self._eps_history: deque[torch.Tensor] = deque(maxlen=int(order))

    def _on_set_timesteps(self) -> None:
        order = int(self.config.order)
        # table[k - 1, n, :k]: coefficients of ε_n, ε_{n-1}, ... when step n uses k values
        table = np.zeros((order, self.num_inference_steps, order))
        model_t = self.timesteps.detach().cpu().to(torch.float64).numpy()
        for n in range(self.num_inference_steps):
            ks = range(1, min(order, n + 1) + 1)
            for k, row in zip(ks, self._step_coefficients(n, list(ks), model_t), strict=True):
                table[k - 1, n, :k] = row
        self._coefficients = table
        self._eps_history = deque(maxlen=order)

    def _step_coefficients(self, n: int, orders: list[int], model_t: np.ndarray) -> list[np.ndarray]:
        """Coefficient rows of step n for each number of ε values in ``orders``."""
        rho = self._rho
        rho_a, rho_b = float(rho[n]), float(rho[n + 1])
        variant = self.config.variant
        if variant == "ipndm":
            return [np.asarray(AB_WEIGHTS[k]) * (rho_b - rho_a) for k in orders]
        if variant == "logrho":
            return [np.array([rho_b - rho_a]) if k == 1 else
                    log_rho_lagrange_integrals(rho_a, rho_b, rho[n - k + 1 : n + 1][::-1]) for k in orders]
        if variant == "rhoab":
            points, weights = gauss_points(rho_a, rho_b)
            nodes, values = rho, points
        else:  # tab: interpolate in t; t(ρ) has kinks at the integer timesteps, so split there
            points, weights = gauss_points(rho_a, rho_b, self.vp_time.rho_knots_between(rho_a, rho_b))
            nodes, values = model_t, self.vp_time.t(points)
        return [lagrange_basis(nodes[n - k + 1 : n + 1][::-1], values) @ weights for k in orders]

    def step_order(self, n: int) -> int:
        """How many ε values step ``n`` uses (warm-up, ``lower_order_final``, ``euler_at_final``)."""
        k = min(int(self.config.order), len(self._eps_history) + 1)
        n_steps = self.num_inference_steps
        if self.config.lower_order_final and n_steps < 15:
            if n == n_steps - 1:
                k = 1
            elif n == n_steps - 2:
                k = min(k, 2)
        if self._euler_at(n):
            k = 1
        if self.config.variant == "logrho" and self._rho[n + 1] == 0.0:
            k = 1  # the step to rho = 0 is infinitely long in log rho: no polynomial extrapolates that far
        return k

    def _solver_step(self, n: int, x: torch.Tensor, eps: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        k = self.step_order(n)
        self._eps_history.appendleft(eps)
        coefficients = self._coefficients[k - 1, n]
        increment = float(coefficients[0]) * eps
        for j in range(1, k):
            increment = increment + float(coefficients[j]) * self._eps_history[j]
        return self._xbar_step(n, x, increment)
