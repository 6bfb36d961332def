"""GHVB: the order label, the beta-generalised weights, PLMS at beta = 1 and DDIM at label 1.0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from scheduler_loops import DUMMY_CONFIG, dummy_model, dummy_sample, max_step_difference, trajectory

from accel_diffusion.schedulers.base import AB_WEIGHTS
from accel_diffusion.schedulers.ghvb import GhvbScheduler, ghvb_weights, split_order_label


@pytest.mark.parametrize(("label", "expected"), [(3.8, (4, 0.8)), (1.5, (2, 0.5)), (2.0, (2, 1.0)), (1.0, (1, 1.0)),
                                                 (0.5, (1, 0.5)), (4.0, (4, 1.0)), (4.9, (5, 0.9))])
def test_order_label(label: float, expected: tuple[int, float]) -> None:
    k, beta = split_order_label(label)
    assert k == expected[0] and beta == pytest.approx(expected[1], abs=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_weights_are_consistent_and_reduce_to_adams_bashforth(k: int) -> None:
    for beta in (0.1, 0.5, 0.8, 1.0):
        assert sum(ghvb_weights(k, beta)) == pytest.approx(1.0, abs=1e-12)  # consistency: exact for constant ε
    if k in AB_WEIGHTS:
        np.testing.assert_allclose(ghvb_weights(k, 1.0), AB_WEIGHTS[k], rtol=1e-14)
    np.testing.assert_allclose(ghvb_weights(5, 1.0), np.array([1901, -2774, 2616, -1274, 251]) / 720, rtol=1e-14)


def test_label_one_is_ddim() -> None:
    ddim = DDIMScheduler(**DUMMY_CONFIG, timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False)
    ghvb = GhvbScheduler(**DUMMY_CONFIG, timestep_spacing="trailing", sigma_spacing=None, final_sigmas_type="sigma_min",
                         order=1.0)
    assert max_step_difference(trajectory(ddim, dummy_model, dummy_sample(), 10),
                               trajectory(ghvb, dummy_model, dummy_sample(), 10)) < 2e-6


@pytest.mark.parametrize("k", [2, 3, 4])
def test_integer_label_is_plms_in_rho_space(k: int) -> None:
    """An independent float64 PLMS-k: x̄_{n+1} = x̄_n + Δρ Σ_j AB_j ε_{n-j}, warm-up with fewer values."""
    ghvb = GhvbScheduler(**DUMMY_CONFIG, order=float(k))
    ours = trajectory(ghvb, dummy_model, dummy_sample().double(), 9)
    rho, t = ghvb.rho, ghvb.timesteps
    alpha = 1 / np.sqrt(1 + rho**2)
    x, history = dummy_sample().double(), []
    for n in range(9):
        history.insert(0, dummy_model(x, t[n]))
        weights = AB_WEIGHTS[min(k, len(history))]
        direction = sum(w * e for w, e in zip(weights, history, strict=False))
        x = alpha[n + 1] * (x / alpha[n] + (rho[n + 1] - rho[n]) * direction)
        assert torch.allclose(ours[n + 1], x, atol=1e-12), n


def test_momentum_changes_the_trajectory_smoothly() -> None:
    base = trajectory(GhvbScheduler(**DUMMY_CONFIG, order=4.0), dummy_model, dummy_sample(), 10)[-1]
    close = trajectory(GhvbScheduler(**DUMMY_CONFIG, order=3.99), dummy_model, dummy_sample(), 10)[-1]
    far = trajectory(GhvbScheduler(**DUMMY_CONFIG, order=3.5), dummy_model, dummy_sample(), 10)[-1]
    assert 0 < float((base - close).abs().max()) < float((base - far).abs().max())


def test_rejects_labels_outside_the_table() -> None:
    for label in (0.0, -1.0, 5.5):
        with pytest.raises(ValueError, match="label"):
            GhvbScheduler(order=label)
