"""f-distill's h(r), its gradient theorem and its weights, on Gaussians with a known density ratio (spec §1.9 A).

Teacher p = N(μ_p, s_p²) and student q_θ = N(m, s²) in 1-D; both stay Gaussian after noising, so r = p_t/q_t
and both scores are exact. Expectations are Gauss–Hermite quadratures (deterministic, ~1e-10 accurate).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from accel_diffusion.students.fdistill import (
    DIVERGENCES,
    H_SCALE,
    FDivWeight,
    f_divergence,
    generator_gradient,
    h_weight,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # small MLPs: one thread is fastest, and fair

ALPHA, SIGMA = 0.8, 0.6
MU_P, S_P = 0.5, 1.0
THETA = (0.1, 0.9)  # student mean and std


def _nodes(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, w = np.polynomial.hermite_e.hermegauss(n)
    return torch.from_numpy(u), torch.from_numpy(w / math.sqrt(2 * math.pi))


def _log_normal(x: torch.Tensor, mean: torch.Tensor | float, var: torch.Tensor | float) -> torch.Tensor:
    return -0.5 * (x - mean) ** 2 / var - 0.5 * torch.log(2 * math.pi * torch.as_tensor(var, dtype=torch.float64))


def _p_t() -> tuple[float, float]:
    return ALPHA * MU_P, ALPHA**2 * S_P**2 + SIGMA**2


def _divergence(name: str, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """D_f(p_t || q_t) = E_{x~q_t} f(p_t(x)/q_t(x)), by quadrature over x = α m + sqrt(v_q) u."""
    u, w = _nodes(200)
    mean_q, var_q = ALPHA * m, ALPHA**2 * s**2 + SIGMA**2
    x = mean_q + torch.sqrt(var_q) * u
    mean_p, var_p = _p_t()
    r = torch.exp(_log_normal(x, mean_p, var_p) - _log_normal(x, mean_q, var_q))
    return (w * f_divergence(name)(r)).sum()


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_h_is_r_squared_f_second_derivative(name: str) -> None:
    r = torch.linspace(0.05, 30.0, 400, dtype=torch.float64, requires_grad=True)
    f = f_divergence(name)
    assert abs(float(f(torch.ones((), dtype=torch.float64)))) < 1e-12  # f(1) = 0
    (df,) = torch.autograd.grad(f(r).sum(), r, create_graph=True)
    (d2f,) = torch.autograd.grad(df.sum(), r)
    exact = r.detach() ** 2 * d2f
    torch.testing.assert_close(exact, H_SCALE[name] * h_weight(name, r.detach()), rtol=1e-9, atol=1e-12)
    assert bool((d2f > 0).all())  # convex


def test_h_table_values() -> None:
    r = torch.tensor([0.5, 1.0, 4.0], dtype=torch.float64)
    expected = {"rkl": [1, 1, 1], "sf": [2 / 3, 0.5, 0.2], "js": [1 / 3, 0.5, 0.8], "sh": [0.5**0.5, 1, 2],
                "kl": [0.5, 1, 4], "jf": [1.5, 2, 5], "neyman": [2, 1, 0.25]}
    for name, values in expected.items():
        torch.testing.assert_close(h_weight(name, r), torch.tensor(values, dtype=torch.float64))


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_gradient_theorem_exact_on_gaussians(name: str) -> None:
    """∇_θ D_f = −E[h(r)(s_p − s_q) ∂x_t/∂θ]; also through ``generator_gradient`` (Tweedie form, no normalizer)."""
    m = torch.tensor(THETA[0], dtype=torch.float64, requires_grad=True)
    s = torch.tensor(THETA[1], dtype=torch.float64, requires_grad=True)
    exact = torch.stack(torch.autograd.grad(_divergence(name, m, s), (m, s)))

    u, w = _nodes(80)
    z, eps = torch.meshgrid(u, u, indexing="ij")
    weight = (w[:, None] * w[None, :]).reshape(-1)
    z, eps = z.reshape(-1), eps.reshape(-1)
    m0, s0 = THETA
    x0 = m0 + s0 * z
    x_t = ALPHA * x0 + SIGMA * eps
    mean_p, var_p = _p_t()
    mean_q, var_q = ALPHA * m0, ALPHA**2 * s0**2 + SIGMA**2
    r = torch.exp(_log_normal(x_t, mean_p, var_p) - _log_normal(x_t, mean_q, var_q))
    h = H_SCALE[name] * h_weight(name, r)
    score_diff = -(x_t - mean_p) / var_p + (x_t - mean_q) / var_q
    dxt = torch.stack([ALPHA * torch.ones_like(z), ALPHA * z])  # ∂x_t/∂(m, s)
    estimator = -(weight * h * score_diff * dxt).sum(1)
    torch.testing.assert_close(estimator, exact, rtol=1e-7, atol=1e-10)
    assert float(exact.abs().max()) > 1e-3  # a real gradient, not zero = zero

    # the trainer's vector: g = h (D_fake − D_teacher) with Tweedie denoisers D = (x_t + σ² s)/α
    teacher_x0 = (x_t + SIGMA**2 * (-(x_t - mean_p) / var_p)) / ALPHA
    fake_x0 = (x_t + SIGMA**2 * (-(x_t - mean_q) / var_q)) / ALPHA
    g = generator_gradient(h, x0[:, None], teacher_x0[:, None], fake_x0[:, None], dmd_normalizer=False)[:, 0]
    dx0 = torch.stack([torch.ones_like(z), z])  # ∂x0/∂(m, s); the loss differentiates x0, not x_t
    via_trainer = (weight * g * dx0).sum(1)
    torch.testing.assert_close(via_trainer, exact * SIGMA**2 / ALPHA**2, rtol=1e-7, atol=1e-10)


def test_weights_from_exact_log_ratio() -> None:
    """FDivWeight on logits = the exact log r gives h(r)/mean h (r inside the clip range, one timestep bin)."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4096, generator=gen, dtype=torch.float64)
    eps = torch.randn(4096, generator=gen, dtype=torch.float64)
    x_t = ALPHA * (THETA[0] + THETA[1] * z) + SIGMA * eps
    mean_p, var_p = _p_t()
    log_r = _log_normal(x_t, mean_p, var_p) - _log_normal(x_t, ALPHA * THETA[0], ALPHA**2 * THETA[1] ** 2 + SIGMA**2)
    assert 0.1 < float(log_r.exp().min()) and float(log_r.exp().max()) < 20
    t = torch.full((4096,), 500.0)
    for name in ("rkl", "kl", "js", "sh"):
        plain = FDivWeight(name, per_t_normalization=False)
        h = h_weight(name, log_r.exp())
        torch.testing.assert_close(plain(log_r[:, None].float(), t).double(), h / h.mean(), rtol=2e-5, atol=1e-6)
        # per-bin normalization divides r by its batch mean in the bin: for kl the weights do not change
        binned = FDivWeight(name)
        got = binned(log_r[:, None].float(), t)
        r_norm = log_r.exp() / log_r.exp().mean()
        torch.testing.assert_close(got.double(), h_weight(name, r_norm) / h_weight(name, r_norm).mean(),
                                   rtol=2e-5, atol=1e-6)
        assert abs(float(binned.bin_means[5]) - float(log_r.exp().mean())) < 1e-4
    assert float(FDivWeight("rkl")(torch.randn(64, 1), torch.rand(64) * 999).std()) == 0.0  # DMD: h ≡ 1


def test_weight_clamps_and_bins() -> None:
    weight = FDivWeight("kl", bins=10, bin_ema=0.5)
    logits = torch.tensor([[-50.0], [50.0], [0.0], [math.log(2.0)]])
    t = torch.tensor([10.0, 10.0, 950.0, 950.0])
    r = weight.ratio(logits, t)
    # bin 0: r clipped to 0.1 and 20 -> mean 10.05, ema 0.5 over 1.0 -> 5.525; bin 9: r 1 and 2 -> 1.25
    torch.testing.assert_close(weight.bin_means[[0, 9]], torch.tensor([5.525, 1.25]))
    torch.testing.assert_close(r, torch.tensor([0.1 / 5.525, 20 / 5.525, 1 / 1.25, 2 / 1.25]))
    torch.testing.assert_close(weight.bin_means[1:9], torch.ones(8))  # bins absent from the batch keep their value
    assert "bin_means" in weight.state_dict()
    with pytest.raises(ValueError, match="divergence: unknown 'tv'"):
        FDivWeight("tv")
