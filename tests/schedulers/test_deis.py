"""DEIS: DDIM at order 1, diffusers parity (logrho), the DPM-Solver identity, polynomial exactness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler
from scheduler_loops import DUMMY_CONFIG, dummy_model, dummy_sample, max_step_difference, trajectory
from scipy.integrate import quad

from accel_diffusion.schedulers.deis import DEIS_VARIANTS, DeisScheduler
from accel_diffusion.schedulers.ghvb import GhvbScheduler

GRIDS = [{"timestep_spacing": "trailing", "sigma_spacing": None},
         {"timestep_spacing": "leading", "steps_offset": 1, "sigma_spacing": None},
         {"sigma_spacing": "quadratic_t"}, {"sigma_spacing": "log_snr"}, {"use_karras_sigmas": True}]


@pytest.mark.parametrize("variant", DEIS_VARIANTS)
@pytest.mark.parametrize(("final", "alpha_to_one"), [("zero", True), ("sigma_min", False)])
def test_order_one_is_ddim(variant: str, final: str, alpha_to_one: bool) -> None:
    ddim = DDIMScheduler(**DUMMY_CONFIG, timestep_spacing="trailing", set_alpha_to_one=alpha_to_one,
                         clip_sample=False)
    ours = DeisScheduler(**DUMMY_CONFIG, timestep_spacing="trailing", sigma_spacing=None, final_sigmas_type=final,
                         variant=variant, order=1)
    a = trajectory(ddim, dummy_model, dummy_sample(), 10)
    b = trajectory(ours, dummy_model, dummy_sample(), 10)
    assert torch.equal(ddim.timesteps, ours.timesteps)
    assert max_step_difference(a, b) < 2e-6


@pytest.mark.parametrize("variant", DEIS_VARIANTS)
@pytest.mark.parametrize("grid", GRIDS)
def test_coefficient_rows_sum_to_the_ddim_coefficient(variant: str, grid: dict) -> None:
    scheduler = DeisScheduler(variant=variant, order=4, **grid)
    scheduler.set_timesteps(12)
    table, rho = scheduler._coefficients, scheduler.rho
    assert table.dtype == np.float64
    for n in range(12):
        for k in range(1, min(4, n + 1) + 1):
            assert table[k - 1, n, :k].sum() == pytest.approx(rho[n + 1] - rho[n], rel=1e-11, abs=1e-14)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_logrho_equals_diffusers_deis_step_by_step(prediction_type: str, order: int) -> None:
    theirs = DEISMultistepScheduler(**DUMMY_CONFIG, solver_order=order, prediction_type=prediction_type)
    ours = DeisScheduler(**DUMMY_CONFIG, variant="logrho", order=order, prediction_type=prediction_type,
                         sigma_spacing=None, final_sigmas_type="sigma_min")
    a = trajectory(theirs, dummy_model, dummy_sample(), 10)
    b = trajectory(ours, dummy_model, dummy_sample(), 10)
    assert max_step_difference(a, b) < 1e-5
    # 25 steps (no lowering) at order 3: diffusers' float32 coefficients lose ~5e-5 to cancellation,
    # so compare in float64 (their sigmas upcast after set_timesteps)
    theirs.set_timesteps(25)
    theirs.sigmas = theirs.sigmas.double()
    states = [dummy_sample().double()]
    for t in theirs.timesteps:
        states.append(theirs.step(dummy_model(states[-1], t), t, states[-1]).prev_sample)
    assert max_step_difference(states, trajectory(ours, dummy_model, dummy_sample().double(), 25)) < 1e-5
    # diffusers' own golden values for this loop (tests/schedulers/test_scheduler_deis.py, order 2, 10 steps)
    if order == 2:
        final = trajectory(ours, dummy_model, dummy_sample(), 10)[-1]
        golden = 0.23916 if prediction_type == "epsilon" else 0.091
        assert float(final.abs().mean()) == pytest.approx(golden, abs=1e-3)


def test_diffusers_full_loop_with_noise_golden_values() -> None:
    """diffusers' DEIS ``test_full_loop_with_noise``: noise added at step 8 of 10, then its last two
    steps (add_noise at an integer timestep, the step index found from the timestep)."""
    scheduler = DeisScheduler(**DUMMY_CONFIG, variant="logrho", order=2, sigma_spacing=None,
                              final_sigmas_type="sigma_min")
    scheduler.set_timesteps(10)
    timesteps = scheduler.timesteps[8:]
    n = 4 * 3 * 8 * 8
    noise = (torch.arange(n).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)
    sample = scheduler.add_noise(dummy_sample(), noise, timesteps[:1])
    for t in timesteps:
        sample = scheduler.step(dummy_model(sample, t), t, sample).prev_sample
    assert float(sample.abs().sum()) == pytest.approx(315.3016, abs=1e-2)
    assert float(sample.abs().mean()) == pytest.approx(0.41054, abs=1e-3)


def test_logrho_order_two_is_dpm_solver_2m_heun() -> None:
    dpm = DPMSolverMultistepScheduler(**DUMMY_CONFIG, algorithm_type="dpmsolver", solver_type="heun", solver_order=2,
                                      final_sigmas_type="sigma_min", lower_order_final=True)
    ours = DeisScheduler(**DUMMY_CONFIG, variant="logrho", order=2, sigma_spacing=None, final_sigmas_type="sigma_min")
    for steps in (8, 20):
        assert max_step_difference(trajectory(dpm, dummy_model, dummy_sample(), steps),
                                   trajectory(ours, dummy_model, dummy_sample(), steps)) < 1e-5


@pytest.mark.parametrize("order", [2, 3, 4])
def test_ipndm_is_plms_and_equals_rhoab_on_equal_rho_steps(order: int) -> None:
    sigmas = np.linspace(8.0, 0.2, 13)
    ipndm = DeisScheduler(**DUMMY_CONFIG, variant="ipndm", order=order, lower_order_final=False)
    rhoab = DeisScheduler(**DUMMY_CONFIG, variant="rhoab", order=order, lower_order_final=False)
    plms = GhvbScheduler(**DUMMY_CONFIG, order=float(order))
    a = trajectory(ipndm, dummy_model, dummy_sample(), sigmas=sigmas)
    assert max_step_difference(a, trajectory(rhoab, dummy_model, dummy_sample(), sigmas=sigmas)) < 1e-6
    assert max_step_difference(a, trajectory(plms, dummy_model, dummy_sample(), sigmas=sigmas)) < 5e-6


@pytest.mark.parametrize(("variant", "order"), [(v, k) for v in ("tab", "rhoab", "logrho") for k in (2, 3, 4)])
def test_polynomial_eps_is_integrated_exactly(variant: str, order: int) -> None:
    """If ε is a polynomial of degree order - 1 in the variant's variable (and ignores x), every
    step with a full history integrates dx̄/dρ = ε exactly."""
    scheduler = DeisScheduler(**DUMMY_CONFIG, variant=variant, order=order, sigma_spacing="quadratic_t",
                              lower_order_final=False)
    scheduler.set_timesteps(9)
    time = scheduler.vp_time
    coeffs = np.linspace(0.7, -0.4, order)

    def variable(rho: float) -> float:
        return {"tab": float(time.t(rho)) / 1000, "rhoab": rho / time.rho_max, "logrho": float(np.log(rho))}[variant]

    def eps_of_rho(rho: float) -> float:
        return float(np.polyval(coeffs, variable(rho)))

    x = torch.zeros(1, dtype=torch.float64)
    rho, alpha = scheduler.rho, scheduler._alpha
    for n, t in enumerate(scheduler.timesteps):
        eps = torch.full((1,), eps_of_rho(float(rho[n])), dtype=torch.float64)
        new = scheduler.step(eps, t, x, return_dict=False)[0]
        if n >= order - 1 and rho[n + 1] > 0:
            increment = float(new / alpha[n + 1] - x / alpha[n])
            kinks = time.rho_knots_between(float(rho[n + 1]), float(rho[n]))  # t(ρ) is piecewise smooth
            exact = -quad(eps_of_rho, float(rho[n + 1]), float(rho[n]), epsabs=1e-14, epsrel=1e-13, limit=2000,
                          points=kinks if variant == "tab" else None)[0]
            assert increment == pytest.approx(exact, rel=1e-8, abs=1e-12), n
        x = new


def test_lower_order_final_follows_diffusers_rule() -> None:
    scheduler = DeisScheduler(order=3)
    scheduler.set_timesteps(10)
    assert scheduler.config.sigma_spacing == "quadratic_t"
    orders = []
    x = dummy_sample()
    for n, t in enumerate(scheduler.timesteps):
        orders.append(scheduler.step_order(n))
        x = scheduler.step(dummy_model(x, t), t, x).prev_sample
    assert orders == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    scheduler.set_timesteps(15)
    assert scheduler.step_order(14) == 1  # history is empty right after set_timesteps: warm-up order
    long = DeisScheduler(order=3)
    long.set_timesteps(15)
    x = dummy_sample()
    for t in long.timesteps[:-1]:
        x = long.step(dummy_model(x, t), t, x).prev_sample
    assert long.step_order(14) == 3  # 15 steps or more: no lowering (diffusers' rule)


def test_default_grid_is_quadratic_t_and_no_model_call_is_wasted() -> None:
    scheduler = DeisScheduler.from_config(DEISMultistepScheduler(use_karras_sigmas=True).config)
    scheduler.set_timesteps(10)
    assert len(scheduler.timesteps) == 10 and np.all(np.diff(scheduler.rho) < 0)  # no duplicated last sigma
    theirs = DEISMultistepScheduler(use_karras_sigmas=True)
    theirs.set_timesteps(10)
    assert theirs.sigmas[-1] == theirs.sigmas[-2]  # diffusers: the last step has length zero
    plain = DeisScheduler()
    plain.set_timesteps(10)
    t = plain.timesteps.double().numpy()
    np.testing.assert_allclose(np.diff(np.sqrt(t)), np.diff(np.sqrt(t)).mean(), rtol=1e-5)
