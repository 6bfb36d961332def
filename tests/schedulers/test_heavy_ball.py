"""Heavy ball: beta = 1 is exactly DPM-Solver++ 2M / PLMS-k; the momentum update; stability."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from scheduler_loops import (
    DUMMY_CONFIG,
    SD_SCHEDULE,
    dummy_model,
    dummy_sample,
    gmm_denoiser,
    gmm_model,
    gmm_noise,
    max_step_difference,
    trajectory,
)

from accel_diffusion.schedulers.ghvb import GhvbScheduler
from accel_diffusion.schedulers.heavy_ball import HeavyBallScheduler

DIFFUSERS_GRID = {"sigma_spacing": None}


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_beta_one_is_diffusers_dpm_solver_pp_2m(spacing: str, final: str, prediction_type: str) -> None:
    common = {**DUMMY_CONFIG, "timestep_spacing": spacing, "steps_offset": 1, "prediction_type": prediction_type,
              "final_sigmas_type": final}
    theirs = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_type="midpoint",
                                         solver_order=2)
    ours = HeavyBallScheduler(**common, **DIFFUSERS_GRID, beta=1.0)
    for steps in (8, 20):  # below and above diffusers' 15-step lower_order_final threshold
        a = trajectory(theirs, dummy_model, dummy_sample(), steps)
        b = trajectory(ours, dummy_model, dummy_sample(), steps)
        assert torch.equal(theirs.timesteps, ours.timesteps)
        assert max_step_difference(a, b) < 1e-5


def test_momentum_update_on_dpm_solver_pp_2m() -> None:
    """An independent float64 transcription of specs/samplers.md §2.3 on the gmm oracle."""
    beta, steps = 0.8, 9
    model = gmm_model(gmm_denoiser())
    scheduler = HeavyBallScheduler(**SD_SCHEDULE, beta=beta, lower_order_final=False)
    ours = trajectory(scheduler, model, gmm_noise(), steps)
    rho, t = scheduler.rho, scheduler.timesteps
    alpha = 1 / np.sqrt(1 + rho**2)
    sigma = rho * alpha
    lam = np.log(alpha / np.where(sigma > 0, sigma, np.nan))
    x, velocity, previous_x0 = gmm_noise(), None, None
    for n in range(steps):
        x0 = (x - sigma[n] * model(x, t[n])) / alpha[n]
        if n == 0 or rho[n + 1] == 0:
            direction = x0
            x = alpha[n + 1] * direction if rho[n + 1] == 0 else (
                sigma[n + 1] / sigma[n] * x - alpha[n + 1] * np.expm1(-(lam[n + 1] - lam[n])) * direction)
        else:
            h, h0 = lam[n + 1] - lam[n], lam[n] - lam[n - 1]
            d = x0 + 0.5 * (x0 - previous_x0) / (h0 / h)
            velocity = d if velocity is None else (1 - beta) * velocity + beta * d
            x = sigma[n + 1] / sigma[n] * x - alpha[n + 1] * np.expm1(-h) * velocity
        previous_x0 = x0
        assert torch.allclose(ours[n + 1], x, atol=1e-12), n


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_plms_base_with_beta_one_is_plms_and_order_one_is_ddim(k: int) -> None:
    hb = HeavyBallScheduler(**DUMMY_CONFIG, beta=1.0, base="plms", plms_order=k)
    plms = GhvbScheduler(**DUMMY_CONFIG, order=float(k))
    assert max_step_difference(trajectory(hb, dummy_model, dummy_sample().double(), 10),
                               trajectory(plms, dummy_model, dummy_sample().double(), 10)) < 1e-12
    if k == 1:
        ddim = DDIMScheduler(**DUMMY_CONFIG, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
        hb_trailing = HeavyBallScheduler(**DUMMY_CONFIG, timestep_spacing="trailing", **DIFFUSERS_GRID, beta=1.0,
                                         base="plms", plms_order=1)
        assert max_step_difference(trajectory(ddim, dummy_model, dummy_sample(), 10),
                                   trajectory(hb_trailing, dummy_model, dummy_sample(), 10)) < 2e-6


@pytest.mark.parametrize("beta", [0.3, 0.5, 0.8])
def test_hb_on_ddim_is_ghvb_with_one_step(beta: float) -> None:
    hb = HeavyBallScheduler(**SD_SCHEDULE, beta=beta, base="plms", plms_order=1)
    ghvb = GhvbScheduler(**SD_SCHEDULE, order=beta)
    model = gmm_model(gmm_denoiser())
    assert max_step_difference(trajectory(hb, model, gmm_noise(), 12), trajectory(ghvb, model, gmm_noise(), 12)) < 1e-12


def linear_test_run(scheduler, z: float, steps: int = 60) -> float:
    """|x̄_N| for dx̄/dρ = c x̄ on equal ρ steps with z = c Δρ (the exact solution decays)."""
    sigmas = np.linspace(9.0, 3.0, steps + 1)
    c = z / (sigmas[1] - sigmas[0])
    scheduler.set_timesteps(sigmas=sigmas)
    x = torch.ones(1, dtype=torch.float64) / np.sqrt(1 + 9.0**2)
    for t in scheduler.timesteps:
        alpha, _ = scheduler.alpha_sigma_at(t)
        x = scheduler.step(c * x / alpha, t, x).prev_sample
    return float(x.abs() * np.sqrt(1 + 3.0**2))


def test_momentum_enlarges_the_stability_region() -> None:
    """Real-axis stability bounds (specs/samplers.md §2.4): AB2 -1.02, GHVB(2, 0.5) -1.52, AB2 + HB 0.5 -3.04."""
    ab2 = GhvbScheduler(**DUMMY_CONFIG, order=2.0)
    ghvb = GhvbScheduler(**DUMMY_CONFIG, order=1.5)
    hb = HeavyBallScheduler(**DUMMY_CONFIG, beta=0.5, base="plms", plms_order=2)
    assert linear_test_run(ab2, -1.2) > 1e3  # outside AB2's region: blows up
    assert linear_test_run(ghvb, -1.2) < 1.0 and linear_test_run(hb, -1.2) < 1.0
    assert linear_test_run(ghvb, -2.0) > 1e3 and linear_test_run(hb, -2.0) < 1.0
    assert linear_test_run(hb, -3.3) > 1e3
