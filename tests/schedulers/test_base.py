"""What all accel-diffusion solvers share: grids, explicit timesteps/sigmas, prediction types,
add_noise, config round trips, state reset, batch independence, diffusers drop-in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
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

from accel_diffusion.schedulers.deis import DeisScheduler
from accel_diffusion.schedulers.ghvb import GhvbScheduler
from accel_diffusion.schedulers.heavy_ball import HeavyBallScheduler

SOLVERS = [
    (DeisScheduler, {"variant": "tab", "order": 3}),
    (DeisScheduler, {"variant": "logrho", "order": 2}),
    (DeisScheduler, {"variant": "ipndm", "order": 4}),
    (HeavyBallScheduler, {"beta": 0.8}),
    (HeavyBallScheduler, {"beta": 0.9, "base": "plms", "plms_order": 4}),
    (GhvbScheduler, {"order": 3.8}),
]
IDS = ["deis-tab3", "deis-logrho2", "deis-ipndm4", "hb-dpmpp", "hb-plms4", "ghvb3.8"]


@pytest.mark.parametrize(("cls", "settings"), SOLVERS, ids=IDS)
def test_config_round_trip_and_drop_in_from_a_diffusers_config(cls: type, settings: dict, tmp_path: Path) -> None:
    scheduler = cls(**SD_SCHEDULE, steps_offset=1, **settings)
    scheduler.save_config(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    def public(config: dict) -> dict:
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert public(loaded.config) == public(scheduler.config)
    sd_config = DPMSolverMultistepScheduler(**SD_SCHEDULE, steps_offset=1, timestep_spacing="leading").config
    dropped_in = cls.from_config(sd_config, **settings)
    for key in ("beta_schedule", "beta_start", "beta_end", "steps_offset", "timestep_spacing"):
        assert dropped_in.config[key] == sd_config[key]
    assert torch.equal(dropped_in.alphas_cumprod, DPMSolverMultistepScheduler(**SD_SCHEDULE).alphas_cumprod)


@pytest.mark.parametrize(("cls", "settings"), SOLVERS, ids=IDS)
def test_prediction_types_give_the_same_trajectory(cls: type, settings: dict) -> None:
    """The oracle answers in ε, v or x0 exactly; the solver must turn each into the same step."""
    runs = []
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        scheduler = cls(**SD_SCHEDULE, prediction_type=prediction_type, sigma_spacing="log_snr", **settings)
        runs.append(trajectory(scheduler, gmm_model(gmm_denoiser(prediction_type)), gmm_noise(), 12))
    assert max_step_difference(runs[0], runs[1]) < 1e-10
    assert max_step_difference(runs[0], runs[2]) < 1e-10


@pytest.mark.parametrize(("cls", "settings"), SOLVERS, ids=IDS)
def test_state_is_reset_and_batch_elements_are_independent(cls: type, settings: dict) -> None:
    model = gmm_model(gmm_denoiser())
    reused = cls(**SD_SCHEDULE, **settings)
    first = trajectory(reused, model, gmm_noise(seed=1), 9)
    second = trajectory(reused, model, gmm_noise(seed=2), 9)
    assert max_step_difference(first, trajectory(cls(**SD_SCHEDULE, **settings), model, gmm_noise(seed=1), 9)) == 0
    assert max_step_difference(second, trajectory(cls(**SD_SCHEDULE, **settings), model, gmm_noise(seed=2), 9)) == 0
    batch = trajectory(cls(**SD_SCHEDULE, **settings), model, gmm_noise(8, seed=3), 9)[-1]
    singles = [trajectory(cls(**SD_SCHEDULE, **settings), model, row[None], 9)[-1] for row in gmm_noise(8, seed=3)]
    assert torch.allclose(batch, torch.cat(singles), rtol=0, atol=1e-12)  # the oracle's batched BLAS rounds
    # with an elementwise model the scheduler's batch elements are bit-for-bit independent
    batch = trajectory(cls(**DUMMY_CONFIG, **settings), dummy_model, dummy_sample(), 9)[-1]
    singles = [trajectory(cls(**DUMMY_CONFIG, **settings), dummy_model, row[None], 9)[-1] for row in dummy_sample()]
    assert torch.equal(batch, torch.cat(singles))


def test_explicit_timesteps_and_sigmas() -> None:
    scheduler = GhvbScheduler(**SD_SCHEDULE, final_sigmas_type="sigma_min")
    scheduler.set_timesteps(timesteps=[999, 700, 300, 50])
    assert scheduler.timesteps.dtype == torch.int64 and scheduler.num_inference_steps == 4
    np.testing.assert_allclose(scheduler.rho[-1], scheduler.vp_time.rho_min)
    scheduler.set_timesteps(timesteps=[998.5, 600.25, 10.5])
    assert scheduler.timesteps.dtype == torch.float32
    np.testing.assert_allclose(scheduler.rho[:-1], scheduler.vp_time.rho([998.5, 600.25, 10.5]), rtol=1e-12)
    scheduler.set_timesteps(sigmas=[14.0, 3.0, 0.5, 0.0])
    assert scheduler.num_inference_steps == 3 and scheduler.rho[-1] == 0.0
    np.testing.assert_allclose(scheduler.rho[:-1], [14.0, 3.0, 0.5], rtol=1e-6)  # float32 timesteps
    np.testing.assert_allclose(scheduler.vp_time.rho(scheduler.timesteps.double().numpy()), scheduler.rho[:-1],
                               rtol=1e-12)  # the model is queried exactly where the solver integrates
    for bad in ({"timesteps": [10, 500]}, {"sigmas": [3.0, 0.0, 0.0]}, {"sigmas": [1.0]},
                {"timesteps": [1000, 10]}, {"num_inference_steps": 4, "timesteps": [900, 10]}, {"mu": 0.5}):
        with pytest.raises(ValueError):
            scheduler.set_timesteps(**bad)


@pytest.mark.parametrize("spacing", ["uniform_t", "quadratic_t", "log_snr", "karras"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_grids_end_where_asked_without_a_wasted_call(spacing: str, final: str) -> None:
    options = {"use_karras_sigmas": True} if spacing == "karras" else {"sigma_spacing": spacing}
    scheduler = HeavyBallScheduler(**SD_SCHEDULE, final_sigmas_type=final, **options)
    scheduler.set_timesteps(7)
    rho = scheduler.rho
    assert len(scheduler.timesteps) == 7 and len(rho) == 8 and np.all(np.diff(rho) < 0)
    assert rho[0] == pytest.approx(scheduler.vp_time.rho_max, rel=1e-6)
    assert rho[-1] == (0.0 if final == "zero" else pytest.approx(scheduler.vp_time.rho_min, rel=1e-12))


def test_add_noise_matches_ddpm_at_integers_and_the_grid_at_fractional_timesteps() -> None:
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    ours = DeisScheduler(**SD_SCHEDULE)
    t_int = torch.tensor([999, 500, 3])
    expected = DDPMScheduler(**SD_SCHEDULE).add_noise(x0, noise, t_int)
    assert torch.allclose(ours.add_noise(x0, noise, t_int), expected, atol=1e-6)
    ours.set_timesteps(6)
    t = ours.timesteps[2:3]
    rho = float(ours.rho[2])
    alpha, sigma = 1 / np.sqrt(1 + rho**2), rho / np.sqrt(1 + rho**2)
    assert torch.allclose(ours.add_noise(x0[:1], noise[:1], t), alpha * x0[:1] + sigma * noise[:1], atol=1e-6)
    assert ours.alpha_sigma_at(t) == pytest.approx((alpha, sigma), rel=1e-9)


def test_img2img_starts_from_the_begin_index() -> None:
    """Starting at step 4 of a 10-step grid = a fresh run on the last 6 levels of that grid."""
    model = gmm_model(gmm_denoiser())
    tail = GhvbScheduler(**SD_SCHEDULE, order=2.5)
    tail.set_timesteps(10)
    rho = tail.rho.copy()
    tail.set_begin_index(4)
    x = gmm_noise()
    for t in tail.timesteps[4:]:
        x = tail.step(model(x, t), t, x).prev_sample
    assert tail.step_index == 10
    fresh = trajectory(GhvbScheduler(**SD_SCHEDULE, order=2.5), model, gmm_noise(), sigmas=rho[4:])
    assert torch.allclose(x, fresh[-1], atol=1e-6)
    with pytest.raises(ValueError, match="all 10 steps are done"):
        tail.step(model(x, tail.timesteps[-1]), tail.timesteps[-1], x)


def test_grid_edge_cases() -> None:
    scheduler = DeisScheduler(**SD_SCHEDULE)
    scheduler.set_timesteps(25)
    scheduler.set_timesteps(sigmas=scheduler.sigmas)  # its own float32 sigmas round-trip
    assert scheduler.num_inference_steps == 25
    with pytest.raises(ValueError, match="final_sigmas_type='zero'"):  # would waste the last model call
        DeisScheduler(**SD_SCHEDULE, final_sigmas_type="sigma_min").set_timesteps(timesteps=[999, 500, 0])
    linspace = DeisScheduler(**SD_SCHEDULE, sigma_spacing=None)
    linspace.set_timesteps(1000)  # rounds onto duplicates: dropped, as diffusers does
    assert len(linspace.timesteps) == len(set(linspace.timesteps.tolist()))
    with pytest.raises(ValueError, match="zero terminal SNR"):
        DeisScheduler.from_config({**{k: v for k, v in scheduler.config.items() if not k.startswith("_")},
                                   "rescale_betas_zero_snr": True})


def test_invalid_explicit_grids_are_refused() -> None:
    scheduler = DeisScheduler(**SD_SCHEDULE)
    for sigmas in ([3.0, 1.0, -0.5], [3.0, float("nan"), 0.0], [float("inf"), 1.0, 0.0]):
        with pytest.raises(ValueError, match="finite and >= 0"):
            scheduler.set_timesteps(sigmas=sigmas)
    with pytest.raises(ValueError, match="finite"):
        scheduler.set_timesteps(timesteps=[999.0, float("nan"), 10.0])


@pytest.mark.parametrize("train_steps", [1000, 4000, 4096])
def test_the_default_grid_stays_inside_the_schedule(train_steps: int) -> None:
    """(sqrt(T) (1 - u))^2 rounds above T = 3999 and 4095: the quadratic-t grid starts exactly at T."""
    scheduler = DeisScheduler(num_train_timesteps=train_steps, beta_schedule="linear")
    scheduler.set_timesteps(10)
    assert float(scheduler.timesteps[0]) == train_steps - 1 and np.isfinite(scheduler.rho).all()


def test_from_config_of_another_of_our_solvers_keeps_only_shared_keys() -> None:
    ghvb = GhvbScheduler(**SD_SCHEDULE, order=3.8)
    deis = DeisScheduler.from_config(ghvb.config)  # a GHVB label is no DEIS order
    assert deis.config.order == DeisScheduler().config.order and deis.config.sigma_spacing == "quadratic_t"
    assert deis.config.beta_schedule == "scaled_linear" and deis.config.beta_end == SD_SCHEDULE["beta_end"]
    back = GhvbScheduler.from_config(DeisScheduler(**SD_SCHEDULE, order=3).config, order=2.8)
    assert back.config.order == 2.8 and back.config.sigma_spacing == GhvbScheduler().config.sigma_spacing
    assert GhvbScheduler.from_config(ghvb.config).config.order == 3.8  # its own config round-trips
    hb = HeavyBallScheduler.from_config(DeisScheduler(**SD_SCHEDULE, variant="logrho").config)
    assert "variant" not in hb.config and hb.config.beta == HeavyBallScheduler().config.beta


def test_small_momentum_keeps_precision() -> None:
    """GHVB's weights divide by beta: label 2.01 (beta 0.01) in float32 stays close to float64."""
    model = gmm_model(gmm_denoiser())
    runs = [trajectory(GhvbScheduler(**SD_SCHEDULE, order=2.01), model, gmm_noise().to(dtype), 20)[-1]
            for dtype in (torch.float32, torch.float64)]
    assert float((runs[0].double() - runs[1]).abs().max()) < 2e-5


def test_a_pipeline_saved_with_our_scheduler_loads_again(tiny_sd_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, local_files_only=True)
    pipe.scheduler = GhvbScheduler.from_config(pipe.scheduler.config, order=3.8)
    pipe.save_pretrained(tmp_path / "saved", safe_serialization=True)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "saved", local_files_only=True)
    assert isinstance(loaded.scheduler, GhvbScheduler) and loaded.scheduler.config.order == 3.8
