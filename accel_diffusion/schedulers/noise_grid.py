"""The VP noise process of a discrete-time model as a continuous map t <-> rho, step grids, and the
float64 quadrature that turns Lagrange interpolation into multistep coefficients.

Notation (specs/samplers.md §0): x_t = alpha_t x0 + sigma_t eps with alpha^2 + sigma^2 = 1,
rho = sigma/alpha (diffusers' ``sigmas``), lambda = -log rho (half log-SNR).

Continuous time: a discrete model only knows alphā at integer t. Between integers ``log alphā``
is interpolated linearly in t (a constant beta per unit interval, exactly the integer values at
integers, monotone), and between t = -1 (alphā = 1, rho = 0) and t = 0. The built-in ``gmm``
oracle answers fractional timesteps with the same rule, so a solver that queries it off the
integers still sees exactly the noise level it integrates over.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
DIFFUSERS_SPACINGS = ("linspace", "leading", "trailing")
SIGMA_SPACINGS = ("uniform_t", "quadratic_t", "log_snr", "karras", "beta")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
BETA_SIGMAS_SHAPE = (0.6, 0.6)  # diffusers' use_beta_sigmas: quantiles of Beta(0.6, 0.6)


def train_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Sequence[float] | np.ndarray | None = None,
) -> torch.Tensor:
    """The training betas, computed like diffusers (float32)."""
    if trained_betas is not None:
        return torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps)
    raise ValueError(f"beta_schedule: unsupported {beta_schedule!r} (allowed: {', '.join(BETA_SCHEDULES)})")


def train_alphas_cumprod(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Sequence[float] | np.ndarray | None = None,
) -> torch.Tensor:
    """alphā at the integer training timesteps, computed like diffusers (float32 betas and cumprod)."""
    betas = train_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
    return torch.cumprod(1.0 - betas, dim=0)


def unclipped_timesteps(alphas_cumprod: torch.Tensor, lambda_min_clipped: float) -> int:
    """How many training timesteps (from t = 0) have lambda = -log rho >= ``lambda_min_clipped``:
    diffusers' multistep solvers space their integer timesteps over these only (float32, as they do)."""
    lambda_t = torch.log(torch.sqrt(alphas_cumprod)) - torch.log(torch.sqrt(1 - alphas_cumprod))
    clipped = int(torch.searchsorted(torch.flip(lambda_t, [0]), lambda_min_clipped))
    return len(alphas_cumprod) - clipped


def alpha_sigma_from_rho(rho: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, sigma) of a VP process at rho = sigma/alpha (float64; rho = 0 gives (1, 0))."""
    rho = np.asarray(rho, dtype=np.float64)
    alpha = 1.0 / np.sqrt(1.0 + rho * rho)
    return alpha, rho * alpha


class ContinuousVpTime:
    """The t <-> rho map of a discrete VP schedule (log alphā piecewise linear in t on [-1, T-1])."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        acp = alphas_cumprod.detach().to(torch.float64).cpu().numpy()
        self.num_train_timesteps = acp.shape[0]
        # knots at t = -1, 0, ..., T-1; log alphā decreasing, so -log alphā (and rho) increasing in t
        self._t_knots = np.arange(-1, self.num_train_timesteps, dtype=np.float64)
        self._neg_log_acp = np.concatenate([[0.0], -np.log(acp)])
        if np.any(np.diff(self._neg_log_acp) <= 0):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        self.rho_knots = np.sqrt(np.expm1(self._neg_log_acp))  # rho at t = -1, 0, ..., T-1
        self.t_max = float(self.num_train_timesteps - 1)

    @property
    def rho_max(self) -> float:
        return float(self.rho_knots[-1])

    @property
    def rho_min(self) -> float:
        """rho at t = 0: the least noise a discrete model was trained on (diffusers' "sigma_min")."""
        return float(self.rho_knots[1])

    def rho(self, t: np.ndarray | float) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        if np.any((t < -1) | (t > self.t_max)):
            raise ValueError(f"timesteps must lie in [-1, {self.t_max:g}]")
        return np.sqrt(np.expm1(np.interp(t, self._t_knots, self._neg_log_acp)))

    def t(self, rho: np.ndarray | float) -> np.ndarray:
        rho = np.asarray(rho, dtype=np.float64)
        if np.any((rho < 0) | (rho > self.rho_max * (1 + 1e-6))):  # float32 copies of rho_max are fine
            raise ValueError(f"sigmas must lie in [0, {self.rho_max:.6g}]")
        return np.interp(np.log1p(rho * rho), self._neg_log_acp, self._t_knots)

    def rho_knots_between(self, rho_a: float, rho_b: float) -> np.ndarray:
        """The knot values of rho strictly inside (min, max) of the two: where t(rho) has kinks."""
        lo, hi = min(rho_a, rho_b), max(rho_a, rho_b)
        return self.rho_knots[(self.rho_knots > lo) & (self.rho_knots < hi)]


def diffusers_timesteps(
    num_steps: int, num_train_timesteps: int, spacing: str, steps_offset: int, last_timestep: int | None = None
) -> np.ndarray:
    """Integer timesteps as diffusers' multistep solvers (DPM-Solver, DEIS, UniPC) space them.

    ``last_timestep``: diffusers' ``lambda_min_clipped`` cut (``unclipped_timesteps``). Where diffusers
    goes wrong, these do not: its "trailing" ``arange`` can overshoot by one step through rounding (61
    steps of 1000 give 62 timesteps, the last -1), "leading" plus ``steps_offset`` can pass T - 1; here
    there are at most ``num_steps`` timesteps, all in [0, T - 1], duplicates dropped.
    """
    last = num_train_timesteps if last_timestep is None else last_timestep
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif spacing == "leading":
        ratio = last // (num_steps + 1)
        ts = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ratio = num_train_timesteps / num_steps
        ts = np.arange(last, 0, -ratio)[:num_steps].round().copy().astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing: unsupported {spacing!r} (allowed: {', '.join(DIFFUSERS_SPACINGS)})")
    ts = np.clip(ts, 0, num_train_timesteps - 1)
    _, first = np.unique(ts, return_index=True)  # many steps can round onto the same timestep (as diffusers)
    return ts[np.sort(first)]


def sigma_grid(
    num_steps: int, spacing: str, time: ContinuousVpTime, karras_rho: float = 7.0, rho_max: float | None = None
) -> np.ndarray:
    """N + 1 noise levels from rho_max to rho_min, uniform in t, sqrt(t), log rho, rho^(1/karras_rho),
    or at the quantiles of Beta(0.6, 0.6) in rho ("beta", diffusers' ``use_beta_sigmas``).

    The first N are where the model is called; the last is rho_min (replaced by 0 for
    ``final_sigmas_type="zero"``), so no model call is wasted on a zero-length step. ``rho_max``
    lowers the top of the grid (``lambda_min_clipped``); by default it is the schedule's.
    """
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    top = time.rho_max if rho_max is None else min(rho_max, time.rho_max)
    t_top = time.t_max if top == time.rho_max else float(time.t(top))
    u = np.linspace(0.0, 1.0, num_steps + 1)
    if spacing == "uniform_t":
        return time.rho(t_top * (1.0 - u))
    if spacing == "quadratic_t":  # DEIS's default: uniform in sqrt(t) between t = T-1 and t = 0
        return time.rho(t_top * (1.0 - u) ** 2)  # not (sqrt(T) (1 - u))^2: that can round above T
    if spacing == "log_snr":
        return np.exp(np.log(top) + u * (np.log(time.rho_min) - np.log(top)))
    if spacing == "karras":
        inv = 1.0 / karras_rho
        return (top**inv + u * (time.rho_min**inv - top**inv)) ** karras_rho
    if spacing == "beta":
        from scipy.special import betaincinv  # the Beta quantile function (scipy.stats.beta.ppf); 0.7 s to import

        return time.rho_min + betaincinv(*BETA_SIGMAS_SHAPE, 1.0 - u) * (top - time.rho_min)
    raise ValueError(f"sigma_spacing: unsupported {spacing!r} (allowed: {', '.join(SIGMA_SPACINGS)})")


# --------------------------------------------------------------------------------------------
# Multistep coefficients: integrals of Lagrange bases over one step, in float64
# --------------------------------------------------------------------------------------------

_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(16)


def lagrange_basis(nodes: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Values of the Lagrange basis polynomials of ``nodes`` at points ``x``: shape (len(nodes), len(x))."""
    out = np.ones((len(nodes), len(x)))
    for j, nj in enumerate(nodes):
        for m, nm in enumerate(nodes):
            if m != j:
                out[j] *= (x - nm) / (nj - nm)
    return out


def gauss_points(a: float, b: float, breakpoints: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Points and weights of 16-point Gauss-Legendre on each smooth piece of [a, b] (either order).

    ``breakpoints`` are points inside the interval where the integrand is not smooth.
    """
    inner = np.sort(np.asarray(breakpoints if breakpoints is not None else [], dtype=np.float64))
    edges = np.concatenate([[a], inner if b > a else inner[::-1], [b]])
    half = 0.5 * np.diff(edges)
    mid = 0.5 * (edges[:-1] + edges[1:])
    points = (mid[:, None] + half[:, None] * _GAUSS_NODES[None, :]).ravel()
    weights = (half[:, None] * _GAUSS_WEIGHTS[None, :]).ravel()
    return points, weights


def log_rho_lagrange_integrals(rho_a: float, rho_b: float, rho_nodes: np.ndarray) -> np.ndarray:
    """c_j = ∫_{rho_a}^{rho_b} l_j(log rho) d rho in closed form (l_j: Lagrange basis in log rho).

    With L = log rho and l_j written as a polynomial in u = L - L_0, the antiderivative of
    u^m dρ is ρ Σ_k (-1)^(m-k) m!/k! u^k, so ``rho_b = 0`` (the last step to zero noise) is exact too.
    """
    log_nodes = np.log(rho_nodes)
    shift = log_nodes[0]
    u_nodes = log_nodes - shift
    coeffs = np.zeros(len(rho_nodes))
    for j in range(len(rho_nodes)):
        others = np.delete(u_nodes, j)
        poly = np.poly(others) / np.prod(u_nodes[j] - others)  # highest power first
        coeffs[j] = _antiderivative(poly, rho_b, shift) - _antiderivative(poly, rho_a, shift)
    return coeffs


def _antiderivative(poly_high_first: np.ndarray, rho: float, shift: float) -> float:
    if rho == 0.0:
        return 0.0
    u = np.log(rho) - shift
    degree = len(poly_high_first) - 1
    total = 0.0
    for power, c in zip(range(degree, -1, -1), poly_high_first, strict=True):
        # ∫ u^m dρ = ρ Σ_{k=0}^{m} (-1)^(m-k) m!/k! u^k
        term, factor = 0.0, 1.0
        for k in range(power, -1, -1):
            term += factor * u**k
            factor *= -k
        total += c * term
    return rho * total
