"""The t <-> rho map, step grids and the float64 Lagrange quadrature behind every solver."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler
from scipy.integrate import quad

from accel_diffusion.models.gmm.denoiser import GmmDenoiser
from accel_diffusion.schedulers.noise_grid import (
    ContinuousVpTime,
    diffusers_timesteps,
    gauss_points,
    lagrange_basis,
    log_rho_lagrange_integrals,
    sigma_grid,
    train_alphas_cumprod,
)

SD_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_equal_diffusers(schedule: str) -> None:
    ours = train_alphas_cumprod(1000, 0.00085, 0.012, schedule)
    theirs = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=schedule).alphas_cumprod
    assert torch.equal(ours, theirs)


def test_time_map_is_exact_at_integers_and_shared_with_the_gmm_oracle() -> None:
    acp = train_alphas_cumprod(1000, 0.00085, 0.012, "scaled_linear")
    time = ContinuousVpTime(acp)
    t_int = np.arange(1000)
    expected = np.sqrt((1 - acp.double().numpy()) / acp.double().numpy())
    np.testing.assert_allclose(time.rho(t_int), expected, rtol=1e-12)
    assert time.rho(-1.0) == 0.0 and time.rho_min == pytest.approx(expected[0], rel=1e-12)
    fractional = np.array([998.75, 500.3, 12.5, 0.25, -0.5])
    np.testing.assert_allclose(time.t(time.rho(fractional)), fractional, atol=1e-9)
    oracle = GmmDenoiser(num_train_timesteps=1000, **SD_SCHEDULE)
    np.testing.assert_allclose(time.rho(fractional), oracle.timestep_to_rho(torch.tensor(fractional)).numpy(),
                               rtol=1e-12)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 10, 25, 50])
def test_integer_spacings_equal_diffusers_multistep_solvers(spacing: str, steps: int) -> None:
    for cls in (DEISMultistepScheduler, DPMSolverMultistepScheduler):
        scheduler = cls(timestep_spacing=spacing, steps_offset=1)
        scheduler.set_timesteps(steps)
        np.testing.assert_array_equal(diffusers_timesteps(steps, 1000, spacing, 1), scheduler.timesteps.numpy())


def test_integer_spacings_stay_inside_the_schedule_where_diffusers_leaves_it() -> None:
    theirs = DPMSolverMultistepScheduler(timestep_spacing="trailing")
    theirs.set_timesteps(61)
    assert len(theirs.timesteps) == 62 and int(theirs.timesteps[-1]) == -1  # arange overshoots by one step
    ours = diffusers_timesteps(61, 1000, "trailing", 0)
    assert len(ours) == 61 and ours[-3:].tolist() == [48, 32, 15]
    ours = diffusers_timesteps(999, 1000, "leading", 1)  # diffusers: 1000, 999, ..., 2
    assert len(ours) == 998 and ours[:2].tolist() == [999, 998] and ours[-1] == 2


@pytest.mark.parametrize("spacing", ["uniform_t", "quadratic_t", "log_snr", "karras", "beta"])
def test_sigma_grids_have_exact_endpoints_and_their_shape(spacing: str) -> None:
    time = ContinuousVpTime(train_alphas_cumprod(1000, 0.00085, 0.012, "scaled_linear"))
    grid = sigma_grid(10, spacing, time)
    assert grid.shape == (11,) and np.all(np.diff(grid) < 0)
    assert grid[0] == pytest.approx(time.rho_max, rel=1e-12) and grid[-1] == pytest.approx(time.rho_min, rel=1e-12)
    if spacing == "uniform_t":
        np.testing.assert_allclose(np.diff(time.t(grid)), -99.9, rtol=1e-9)
    elif spacing == "quadratic_t":
        np.testing.assert_allclose(np.diff(np.sqrt(np.clip(time.t(grid), 0, None))), -np.sqrt(999) / 10, rtol=1e-9)
    elif spacing == "log_snr":
        np.testing.assert_allclose(np.diff(np.log(grid)), np.log(time.rho_min / time.rho_max) / 10, rtol=1e-12)
    elif spacing == "beta":  # diffusers' beta sigmas (N points) are ours at N - 1 intervals
        reference = DPMSolverMultistepScheduler(**SD_SCHEDULE, use_beta_sigmas=True)
        reference.set_timesteps(11)
        np.testing.assert_allclose(grid, reference.sigmas[:-1].double().numpy(), rtol=1e-6)
    else:  # diffusers' Karras sigmas (N points) are our N + 1 point grid's rule at N - 1 intervals
        reference = DPMSolverMultistepScheduler(**SD_SCHEDULE, use_karras_sigmas=True)
        reference.set_timesteps(11)
        np.testing.assert_allclose(grid, reference.sigmas[:-1].double().numpy(), rtol=1e-6)


def test_log_rho_integrals_match_quadrature_including_the_step_to_zero() -> None:
    nodes = np.array([0.3, 0.5, 0.9])
    for rho_a, rho_b in ((0.3, 0.17), (0.3, 0.0)):
        ours = log_rho_lagrange_integrals(rho_a, rho_b, nodes)
        for j in range(3):
            def basis(r: float, j: int = j) -> float:
                return float(lagrange_basis(np.log(nodes), np.array([np.log(r)]))[j, 0])
            expected = -quad(basis, rho_b, rho_a, epsabs=1e-13, epsrel=1e-13, limit=200)[0]
            assert ours[j] == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert ours.sum() == pytest.approx(rho_b - rho_a, rel=1e-13)  # the basis sums to one


def test_gauss_points_are_exact_for_polynomials_and_split_at_breakpoints() -> None:
    points, weights = gauss_points(2.0, 0.5, breakpoints=np.array([1.0, 1.7]))
    assert weights @ (points**3 - 2 * points) == pytest.approx((0.5**4 - 2**4) / 4 - (0.5**2 - 2**2), rel=1e-14)
    assert weights.sum() == pytest.approx(-1.5, rel=1e-14)
    points, weights = gauss_points(0.0, 3.0, breakpoints=np.array([1.0]))
    assert weights @ np.abs(points - 1.0) == pytest.approx(2.5, rel=1e-14)  # exact: the kink is an edge
