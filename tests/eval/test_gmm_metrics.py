"""GMM measuring sticks: endpoint error, MMD, mode weights, observed order."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math

import numpy as np
import pytest
import torch

from accel_diffusion.eval.gmm_metrics import (
    endpoint_error,
    mmd_rbf,
    mode_weight_error,
    mode_weights,
    observed_order,
)
from accel_diffusion.models.gmm import default_mixture

pytestmark = pytest.mark.usefixtures("single_thread")  # float64 oracle numbers on one thread


def test_endpoint_error_golden() -> None:
    x = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    exact = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    err = endpoint_error(x, torch.from_numpy(exact))
    assert err["mean"] == pytest.approx(2.0, abs=1e-15)  # distances 0, 5, 1
    assert err["max"] == pytest.approx(5.0, abs=1e-15)
    assert err["rms"] == pytest.approx(math.sqrt(26.0 / 3.0), abs=1e-15)
    with pytest.raises(ValueError, match="same shape"):
        endpoint_error(x, exact[:2])


def _mmd_reference(x: np.ndarray, y: np.ndarray, hs: list[float]) -> float:
    def k(a: np.ndarray, b: np.ndarray) -> float:
        d2 = float(((a - b) ** 2).sum())
        return sum(math.exp(-d2 / (2 * h * h)) for h in hs)

    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return kxx + kyy - 2 * kxy


def test_mmd_matches_loop_reference_with_blocks() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 2))
    y = rng.normal(size=(17, 2)) + 0.5
    hs = [0.3, 1.0, 2.5]
    ref = _mmd_reference(x, y, hs)
    assert mmd_rbf(x, y, bandwidths=hs, block=5) == pytest.approx(ref, rel=1e-12, abs=1e-14)
    assert mmd_rbf(x, y, bandwidths=hs) == pytest.approx(ref, rel=1e-12, abs=1e-14)


def test_mmd_same_distribution_near_zero_and_shift_detected() -> None:
    mix = default_mixture()
    a = mix.sample(2000, torch.Generator().manual_seed(1))
    b = mix.sample(2000, torch.Generator().manual_seed(2))
    same = mmd_rbf(a, b)
    shifted = mmd_rbf(a, b + torch.tensor([0.3, 0.0], dtype=torch.float64))
    # measured over 5 seed pairs: same in [-1.5e-3, 1.5e-3], shifted by 0.3 in [0.064, 0.072]
    assert abs(same) < 4e-3  # this pair: -9.7e-4
    assert shifted > 0.04  # this pair: 0.064


def test_mode_weights_exact_on_points_at_the_means() -> None:
    mix = default_mixture()
    counts = np.array([5, 7, 9, 11, 13, 15, 8, 12, 20])  # = 100 × the true weights
    x = np.repeat(mix.means.numpy(), counts, axis=0)
    np.testing.assert_allclose(mode_weights(x, mix), counts / 100.0, rtol=0, atol=1e-15)
    assert mode_weight_error(x, mix) < 1e-15
    lopsided = np.repeat(mix.means.numpy()[[0, 8]], [30, 70], axis=0)
    w = mode_weights(lopsided, mix)
    np.testing.assert_allclose(w, [0.3, 0, 0, 0, 0, 0, 0, 0, 0.7], rtol=0, atol=1e-15)
    assert mode_weight_error(lopsided, mix) == pytest.approx(0.5, abs=1e-15)  # centre: 0.7 vs 0.2


@pytest.mark.parametrize("p", [1.0, 2.0, 3.75])
def test_observed_order_recovers_exponent(p: float) -> None:
    ns = [5, 10, 20, 40, 80]
    errors = [3.7 * n**-p for n in ns]
    assert observed_order(ns, errors) == pytest.approx(p, abs=1e-12)


def test_observed_order_least_squares_with_noise() -> None:
    ns = np.array([5, 10, 20, 40])
    noise = np.array([1.1, 0.9, 1.05, 0.95])
    errors = 2.0 * ns**-2.0 * noise
    slope = np.polyfit(np.log(ns), np.log(errors), 1)[0]
    assert observed_order(ns, errors) == pytest.approx(-slope, abs=1e-12)
    assert observed_order(ns, errors) == pytest.approx(2.0, abs=0.1)
    with pytest.raises(ValueError):
        observed_order([5], [0.1])
