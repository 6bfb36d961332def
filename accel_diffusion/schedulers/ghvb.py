"""Generalized heavy ball (GHVB; Wizadwongsa et al., ICLR 2024), specs/samplers.md §2.4.

Momentum on ε before the multistep combination, with Adams-Bashforth weights re-derived as
functions of beta so the method keeps order k (HB drops to order 1) while its stability region
grows as beta decreases. In x̄ = x/α, ρ = σ/α:

    v_n     = (1 - beta) v_{n-1} + beta ε_n          (v_0 = ε_0)
    x̄_{n+1} = x̄_n + Δρ_n · A_k^beta(v_n, v_{n-1}, ..., v_{n-k+1})

The order is given by the paper's fractional label r: k = floor(r) + 1 and beta = r - floor(r)
for fractional r, k = r and beta = 1 for integer r. So 3.8 is the 4-step method with beta 0.8,
1.5 the 2-step method with beta 0.5, 4.0 is PLMS-4 and 1.0 is DDIM. The first steps warm up with
min(k, steps so far) values. The A_k^beta weights assume equal steps in ρ, as PLMS does: on
unequal steps the method is second order for k >= 2 (the equal-step error terms of order 3 and
up no longer cancel), on equal steps it is order k.

The default grid is uniform in log-SNR; ``sigma_spacing=None`` uses diffusers' ``timestep_spacing``.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401 (diffusers' loader looks it up here)

from accel_diffusion.schedulers.base import VpSolverScheduler

MAX_STEPS = 5


def ghvb_weights(k: int, beta: float) -> tuple[float, ...]:
    """A_k^beta, newest first (at beta = 1: the Adams-Bashforth weights AB_k)."""
    b = beta
    numerators = {
        1: (b,),
        2: (2 + b, -(2 - b)),
        3: (18 + 5 * b, -(24 - 8 * b), 6 - b),
        4: (46 + 9 * b, -(78 - 19 * b), 42 - 5 * b, -(10 - b)),
        5: (1650 + 251 * b, -(3420 - 646 * b), 2880 - 264 * b, -(1380 - 106 * b), 270 - 19 * b),
    }[k]
    denominator = {1: 1, 2: 2, 3: 12, 4: 24, 5: 720}[k] * b
    return tuple(w / denominator for w in numerators)


def split_order_label(label: float) -> tuple[int, float]:
    """(k, beta) of a fractional order label: 3.8 -> (4, 0.8), 2.0 -> (2, 1.0), 0.5 -> (1, 0.5)."""
    whole = math.floor(label)
    if label == whole:
        return int(whole), 1.0
    return int(whole) + 1, float(label - whole)


class GhvbScheduler(VpSolverScheduler):
    """GHVB with the fractional order label ``order`` (e.g. 3.8: 4 steps, beta 0.8; 1.0: DDIM)."""

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
        order: float = 3.8,
    ) -> None:
        if not 0.0 < order <= MAX_STEPS:
            raise ValueError(f"order: the label must be in (0, {MAX_STEPS}], got {order}")
        self.steps_used, self.beta = split_order_label(order)
        self._init_noise_process()
        self._reset_state()

    def _reset_state(self) -> None:
        self._velocity: torch.Tensor | None = None
        # d_n = eps_n - v_{n-1} = (v_n - v_{n-1}) / beta, newest first: the k - 1 the weights need
        self._differences: deque[torch.Tensor] = deque(maxlen=self.steps_used - 1)

    def _on_set_timesteps(self) -> None:
        self._reset_state()

    def _solver_step(self, n: int, x: torch.Tensor, eps: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        # A^beta_k(v_n, ..., v_{n-k+1}) = v_n - sum_i c_i d_{n-i} with c_i = beta sum_{j>i} w_j (the weights
        # sum to 1, and v_{n-j} = v_n - beta (d_n + ... + d_{n-j+1})). The weights w_j carry 1 / beta while
        # consecutive velocities differ by O(beta); beta w_j does not, so the step stays exact in the
        # latents' own float32 (no float64, which MPS and some accelerators lack).
        if self._velocity is None:
            velocity = eps
        else:
            difference = eps - self._velocity
            velocity = eps if self.beta == 1.0 else self._velocity + self.beta * difference  # beta 1: PLMS, exactly
            self._differences.appendleft(difference)
        self._velocity = velocity
        k = 1 if self._euler_at(n) else min(self.steps_used, len(self._differences) + 1)
        weights = ghvb_weights(k, self.beta)
        direction = eps if self._euler_at(n) else velocity  # euler_at_final: a DDIM step, no momentum
        for i in range(k - 1):
            direction = direction - (self.beta * float(sum(weights[i + 1:]))) * self._differences[i]
        return self._xbar_step(n, x, (float(self._rho[n + 1] - self._rho[n]) * direction).to(x.dtype))
