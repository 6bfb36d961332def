"""The gmm oracle: exact ε̂, exact PF-ODE endpoints, diffusers model/pipeline behaviour."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from accel_diffusion.eval.gmm_metrics import endpoint_error, mode_weight_error
from accel_diffusion.models.gmm import (
    BUILTIN_GMM_DIR,
    GaussianMixture,
    GmmDenoiser,
    GmmPipeline,
    alpha_sigma_from_rho,
    build_default_gmm_pipeline,
    ddim_scheduler_for,
    default_mixture,
    gaussian_pf_ode_map,
    load_gmm_pipeline,
    pf_ode_endpoint,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # float64 oracle numbers on one thread


@pytest.fixture(scope="module")
def mixture() -> GaussianMixture:
    return default_mixture()


@pytest.fixture(scope="module")
def denoiser(mixture: GaussianMixture) -> GmmDenoiser:
    return GmmDenoiser.from_mixture(mixture)


def test_default_mixture_is_nontrivial(mixture: GaussianMixture) -> None:
    assert mixture.num_components == 9
    assert mixture.dim == 2
    assert float(mixture.weights.sum()) == pytest.approx(1.0, abs=1e-15)
    assert float(mixture.weights.min()) == pytest.approx(0.05)
    assert float(mixture.weights.max()) == pytest.approx(0.20)
    x, labels = mixture.sample_with_labels(50_000, torch.Generator().manual_seed(0))
    freq = torch.bincount(labels, minlength=9).double() / 50_000
    assert float((freq - mixture.weights).abs().max()) < 0.01
    assert float((x.abs() > 1).any(dim=1).double().mean()) > 0.5  # most mass outside [-1, 1]²
    # empirical mean vs Σ w_k μ_k
    exact_mean = (mixture.weights[:, None] * mixture.means).sum(0)
    assert float((x.mean(0) - exact_mean).abs().max()) < 0.02


@pytest.mark.parametrize("alpha", [0.999, 0.7, 0.2, 0.01])
def test_eps_equals_minus_sigma_autograd_score(mixture: GaussianMixture, alpha: float) -> None:
    sigma = math.sqrt(1 - alpha**2)
    x = mixture.sample(500, torch.Generator().manual_seed(1)) * alpha + sigma * torch.randn(
        500, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(mixture.marginal_log_prob(xr, alpha, sigma).sum(), xr)
    err = float((mixture.eps(x, alpha, sigma) + sigma * grad).abs().max())
    assert err < 1e-10


def test_eps_per_sample_noise_levels_match_scalar_calls(mixture: GaussianMixture) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 2, generator=g, dtype=torch.float64) * 2
    alpha = torch.rand(64, generator=g, dtype=torch.float64) * 0.9 + 0.05
    sigma = (1 - alpha**2).sqrt()
    batched = mixture.eps(x, alpha, sigma)
    single = torch.cat([mixture.eps(x[i : i + 1], alpha[i], sigma[i]) for i in range(64)])
    assert float((batched - single).abs().max()) < 1e-13
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(mixture.marginal_log_prob(xr, alpha, sigma).sum(), xr)
    assert float((batched + sigma[:, None] * grad).abs().max()) < 1e-10


def test_eps_numpy_in_numpy_out(mixture: GaussianMixture) -> None:
    x = np.array([[0.3, -2.0], [1.0, 1.0]])
    out = mixture.eps(x, 0.6, 0.8)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, mixture.eps(torch.from_numpy(x), 0.6, 0.8).numpy(), rtol=0, atol=0)


def test_one_component_reduces_to_closed_form() -> None:
    mu = np.array([0.7, -1.3])
    cov = np.array([[0.2, 0.05], [0.05, 0.1]])
    single = GaussianMixture([1.0], mu[None], cov[None])
    x = np.random.default_rng(0).normal(size=(200, 2)) * 2
    for alpha in (0.95, 0.5, 0.05):
        sigma = math.sqrt(1 - alpha**2)
        c = alpha**2 * cov + sigma**2 * np.eye(2)
        expected = sigma * np.linalg.solve(c, (x - alpha * mu).T).T
        np.testing.assert_allclose(single.eps(x, alpha, sigma), expected, rtol=0, atol=1e-13)
    # isotropic N(μ, s²I): ε* = σ (x − α μ)/(α² s² + σ²) (specs/samplers.md §1.10-4)
    iso = GaussianMixture([1.0], mu[None], (0.3**2 * np.eye(2))[None])
    alpha, sigma = 0.4, math.sqrt(1 - 0.16)
    expected = sigma * (x - alpha * mu) / (alpha**2 * 0.09 + sigma**2)
    np.testing.assert_allclose(iso.eps(x, alpha, sigma), expected, rtol=0, atol=1e-13)


def test_component_conditioning(mixture: GaussianMixture) -> None:
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2
    labels = torch.arange(30) % 10 - 1  # −1 (unconditional) and 0..8
    out = mixture.eps(x, 0.5, math.sqrt(0.75), labels)
    for i in range(30):
        k = int(labels[i])
        ref = mixture.eps(x[i : i + 1], 0.5, math.sqrt(0.75))
        if k >= 0:
            ref = mixture.component(k).eps(x[i : i + 1], 0.5, math.sqrt(0.75))
        assert float((out[i] - ref[0]).abs().max()) < 1e-14


@pytest.mark.parametrize(("rho_start", "rho_end"), [(14.6, 0.0), (158.0, 0.0), (14.6, 0.5), (0.03, 80.0)])
def test_pf_ode_endpoint_matches_gaussian_closed_form(rho_start: float, rho_end: float) -> None:
    mu, s = [0.7, -1.3], 0.3
    single = GaussianMixture([1.0], [mu], [[[s * s, 0.0], [0.0, s * s]]])
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2
    exact = gaussian_pf_ode_map(x, mu, s, rho_start, rho_end)
    solved = pf_ode_endpoint(single, x, rho_start, rho_end)
    err = float((solved - exact).norm(dim=1).max())
    assert err < 1e-7  # measured ~1e-10


def test_gaussian_map_keeps_z_constant() -> None:
    x = np.array([[3.0, -1.0]])
    y = gaussian_pf_ode_map(x, [1.0, 0.0], 0.5, 10.0, 0.0)
    a0, s0 = alpha_sigma_from_rho(10.0)
    z = (x - a0 * np.array([1.0, 0.0])) / math.sqrt(a0**2 * 0.25 + s0**2)
    np.testing.assert_allclose(y, np.array([[1.0, 0.0]]) + 0.5 * z, rtol=0, atol=1e-14)


def test_pf_ode_mixture_roundtrip_and_tolerance(mixture: GaussianMixture) -> None:
    x_t = torch.randn(128, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x0 = pf_ode_endpoint(mixture, x_t, 14.6, 0.0)
    tight = pf_ode_endpoint(mixture, x_t, 14.6, 0.0, rtol=1e-12, atol=1e-14)
    assert float((x0 - tight).norm(dim=1).max()) < 1e-8
    back = pf_ode_endpoint(mixture, x0, 0.0, 14.6)  # the flow is invertible
    assert float((back - x_t).norm(dim=1).max()) < 1e-6


def test_discrete_schedule_matches_diffusers(denoiser: GmmDenoiser) -> None:
    sched = ddim_scheduler_for(denoiser)
    t = torch.arange(1000)
    alpha, sigma = denoiser.alpha_sigma(t)
    acp = sched.alphas_cumprod.double()
    assert float((alpha**2 - acp).abs().max() / acp.min()) < 1e-12
    assert float((alpha**2 + sigma**2 - 1).abs().max()) < 1e-14
    assert denoiser.rho_max == pytest.approx(14.6146, abs=1e-3)
    # fractional timesteps: log ᾱ is linear between integer timesteps; t = −1 is ρ = 0
    a_half, _ = denoiser.alpha_sigma(torch.tensor([10.5]))
    expected = math.sqrt(math.sqrt(float(acp[10]) * float(acp[11])))
    assert float(a_half) == pytest.approx(expected, rel=1e-13)
    assert float(denoiser.timestep_to_rho(-1)) == 0.0
    ts = torch.tensor([-1.0, -0.25, 0.0, 3.7, 500.0, 998.5, 999.0], dtype=torch.float64)
    back = denoiser.rho_to_timestep(denoiser.timestep_to_rho(ts))
    assert float((back - ts).abs().max()) < 1e-9
    with pytest.raises(ValueError, match="timestep"):
        denoiser.alpha_sigma(1000)


def test_denoiser_forward_scalar_and_per_batch_timesteps(denoiser: GmmDenoiser) -> None:
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(7))
    t = torch.tensor(421)
    out = denoiser(x, t).sample
    assert out.dtype == torch.float32 and out.shape == (16, 2)
    a, s = denoiser.alpha_sigma(421)
    ref = denoiser.mixture.eps(x.double(), a, s)
    assert float((out.double() - ref).abs().max()) < 1e-6
    per_batch = denoiser(x, torch.full((16,), 421)).sample
    assert torch.equal(out, per_batch)
    mixed_t = torch.linspace(0, 999, 16)
    mixed = denoiser(x.double(), mixed_t).sample
    for i in (0, 7, 15):
        single = denoiser(x[i : i + 1].double(), float(mixed_t[i])).sample
        assert float((mixed[i] - single[0]).abs().max()) < 1e-14
    eps_rho = denoiser.eps_at_rho(x.double(), denoiser.timestep_to_rho(421))
    assert float((eps_rho - ref).abs().max()) < 1e-12
    labels = torch.full((16,), 3)
    cond = denoiser(x.double(), t, class_labels=labels).sample
    assert float((cond - denoiser.mixture.component(3).eps(x.double(), a, s)).abs().max()) < 1e-14


def test_v_prediction_and_sample_conversions_consistent(mixture: GaussianMixture) -> None:
    eps_model = GmmDenoiser.from_mixture(mixture, prediction_type="epsilon")
    v_model = GmmDenoiser.from_mixture(mixture, prediction_type="v_prediction")
    x0_model = GmmDenoiser.from_mixture(mixture, prediction_type="sample")
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    for t in (0, 250, 999):
        a, s = eps_model.alpha_sigma(t)
        eps = eps_model(x, t).sample
        v = v_model(x, t).sample
        x0 = x0_model(x, t).sample
        assert float(((s * x + a * v) - eps).abs().max()) < 1e-12  # ε = σ x + α v
        assert float(((a * x - s * v) - x0).abs().max()) < 1e-12  # x0 = α x − σ v
        assert float(((x - s * eps) / a - x0).abs().max()) < 1e-12
    # DDIM with the matching prediction_type follows the same trajectory
    outs = []
    for model in (eps_model, v_model):
        sched = ddim_scheduler_for(model)
        sched.set_timesteps(20)
        z = torch.randn(100, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        for t in sched.timesteps:
            z = sched.step(model(z, t).sample, t, z).prev_sample
        outs.append(z)
    assert float((outs[0] - outs[1]).abs().max()) < 1e-6  # scheduler's float32 ᾱ limits this


def test_ddim_1000_steps_recovers_mixture_and_exact_endpoints(mixture: GaussianMixture, denoiser: GmmDenoiser) -> None:
    sched = DDIMScheduler.from_config(ddim_scheduler_for(denoiser).config, timestep_spacing="trailing")
    sched.set_timesteps(1000)
    assert int(sched.timesteps[0]) == 999 and int(sched.timesteps[-1]) == 0
    x_T = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    x = x_T
    for t in sched.timesteps:
        x = sched.step(denoiser(x, t).sample, t, x).prev_sample
    mwe = mode_weight_error(x, mixture)
    assert mwe < 0.02  # measured 0.0047 (exact samples: 0.0039)
    rho_end = float(denoiser.timestep_to_rho(0))  # set_alpha_to_one=False: DDIM stops at t = 0
    exact = pf_ode_endpoint(mixture, x_T[:1000], denoiser.rho_max, rho_end)
    err = endpoint_error(x[:1000], exact)
    assert err["mean"] < 5e-3 and err["max"] < 0.1  # measured mean 1.7e-3, max 3.7e-2


def test_denoiser_save_load_roundtrip(tmp_path: Path, denoiser: GmmDenoiser) -> None:
    denoiser.save_pretrained(tmp_path / "d")
    files = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = GmmDenoiser.from_pretrained(tmp_path / "d")
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    for t in (0, 17.5, torch.arange(32) * 31):
        assert torch.equal(loaded(x, t).sample, denoiser(x, t).sample)
    assert torch.equal(loaded.mixture_means, denoiser.mixture.means)
    # a dtype cast of the module does not change the float64 computation
    cast = GmmDenoiser.from_pretrained(tmp_path / "d", torch_dtype=torch.float32)
    assert torch.equal(cast(x, 500).sample, denoiser(x, 500).sample)


def test_pipeline_save_load_roundtrip(tmp_path: Path) -> None:
    pipe = build_default_gmm_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "p")
    loaded = GmmPipeline.from_pretrained(tmp_path / "p", local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.denoiser, GmmDenoiser)
    assert isinstance(loaded.scheduler, DDIMScheduler)
    a = pipe(batch_size=64, num_inference_steps=10, generator=torch.Generator().manual_seed(12)).samples
    b = loaded(batch_size=64, num_inference_steps=10, generator=torch.Generator().manual_seed(12)).samples
    np.testing.assert_array_equal(a, b)


def test_shipped_dir_loads() -> None:
    files = sorted(str(p.relative_to(BUILTIN_GMM_DIR)) for p in BUILTIN_GMM_DIR.rglob("*") if p.is_file())
    assert files == [
        "denoiser/config.json",
        "denoiser/diffusion_pytorch_model.safetensors",
        "model_index.json",
        "scheduler/scheduler_config.json",
    ]
    pipe = load_gmm_pipeline()
    pipe.set_progress_bar_config(disable=True)
    ref = build_default_gmm_pipeline()
    loaded_cfg = {k: v for k, v in pipe.denoiser.config.items() if not k.startswith("_")}
    assert loaded_cfg == {k: v for k, v in ref.denoiser.config.items() if not k.startswith("_")}
    sc = pipe.scheduler.config
    assert (sc.clip_sample, sc.set_alpha_to_one, sc.steps_offset) == (False, False, 1)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    assert torch.equal(pipe.denoiser(x, 300).sample, ref.denoiser(x, 300).sample)
    out = pipe(batch_size=4000, num_inference_steps=50, generator=torch.Generator().manual_seed(14))
    assert mode_weight_error(out.samples, default_mixture()) < 0.03
