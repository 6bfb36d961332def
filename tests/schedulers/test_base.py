"""What all accel-diffusion solvers share: grids, explicit timesteps/sigmas, prediction types,
add_noise, config round trips, state reset, batch independence, diffusers drop-in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler
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


# ---- diffusers' multistep-solver config keys (issue #16, items 17-19) --------------------------------

CLASSES = [DeisScheduler, HeavyBallScheduler, GhvbScheduler]
DIFFUSERS_KEYS = {"use_exponential_sigmas": True, "use_beta_sigmas": True, "use_lu_lambdas": True,
                  "lambda_min_clipped": -5.1, "thresholding": True, "dynamic_thresholding_ratio": 0.9,
                  "sample_max_value": 1.5, "variance_type": "learned_range", "euler_at_final": True}


def loud_model(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Half of the dummy model's ε: x̂0 leaves [-1, 1] at high noise, so thresholding acts."""
    return 0.5 * dummy_model(sample, t)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "trained"])
def test_betas_and_alphas_equal_diffusers(cls: type, schedule: str) -> None:
    config = {"beta_schedule": "linear", "trained_betas": np.linspace(1e-4, 0.03, 500).tolist(),
              "num_train_timesteps": 500} if schedule == "trained" else {**SD_SCHEDULE, "beta_schedule": schedule}
    ours, theirs = cls(**config), DPMSolverMultistepScheduler(**config)
    for name in ("betas", "alphas", "alphas_cumprod"):
        assert getattr(ours, name).dtype == torch.float32
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(("key", "value"), DIFFUSERS_KEYS.items(), ids=list(DIFFUSERS_KEYS))
def test_diffusers_solver_keys_are_taken_directly_and_from_a_diffusers_config(cls: type, key: str,
                                                                              value: object) -> None:
    assert cls(**{key: value}).config[key] == value
    assert cls.from_config(DPMSolverMultistepScheduler(**{key: value}).config).config[key] == value


def test_bad_values_of_diffusers_solver_keys_are_refused() -> None:
    both = {"use_karras_sigmas": True, "use_beta_sigmas": True}
    for settings, field in ((both, "use_karras_sigmas, use_beta_sigmas: each selects a sigma grid"),
                            ({"dynamic_thresholding_ratio": 0.0}, "dynamic_thresholding_ratio"),
                            ({"sample_max_value": 0.0}, "sample_max_value"),
                            ({"variance_type": "learned_log"}, "variance_type"),
                            ({"lambda_min_clipped": 5.0}, "lambda_min_clipped: 5.0 leaves no noise level")):
        with pytest.raises(ValueError, match=field):
            GhvbScheduler(**SD_SCHEDULE, **settings)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_threshold_sample_equals_diffusers(dtype: torch.dtype) -> None:
    from accel_diffusion.schedulers.base import threshold_sample

    x0 = (torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.5, 1.2, 4.0])[:, None,
          None, None]).to(dtype)
    theirs = DPMSolverMultistepScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    ours = threshold_sample(x0, 0.9, 1.5)
    assert ours.dtype == dtype and torch.equal(ours, theirs._threshold_sample(x0))
    assert torch.equal(ours[0], x0[0].clamp(-1, 1))  # quantile below 1: s = 1, plain clipping
    assert torch.equal(ours[2], (x0[2].clamp(-1.5, 1.5) / 1.5).to(dtype))  # quantile above 1.5: s = sample_max_value


def test_thresholding_equals_diffusers_deis_and_dpm_solver_pp() -> None:
    settings = {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5}
    deis = DEISMultistepScheduler(**DUMMY_CONFIG, solver_order=2, **settings)
    ours = DeisScheduler.from_config(deis.config, variant="logrho", order=2, sigma_spacing=None,
                                     final_sigmas_type="sigma_min")
    assert ours.config.thresholding and ours.config.sample_max_value == 1.5
    a, b = trajectory(deis, loud_model, dummy_sample(), 10), trajectory(ours, loud_model, dummy_sample(), 10)
    assert max_step_difference(a, b) < 1e-5
    plain = trajectory(DeisScheduler.from_config(DEISMultistepScheduler(**DUMMY_CONFIG).config, variant="logrho",
                                                 order=2, sigma_spacing=None, final_sigmas_type="sigma_min"),
                       loud_model, dummy_sample(), 10)
    assert max_step_difference(plain, b) > 0.1  # thresholding changes the trajectory
    dpm = DPMSolverMultistepScheduler(**DUMMY_CONFIG, **settings)
    hb = HeavyBallScheduler(**DUMMY_CONFIG, **settings, sigma_spacing=None, beta=1.0)
    assert max_step_difference(trajectory(dpm, loud_model, dummy_sample(), 10),
                               trajectory(hb, loud_model, dummy_sample(), 10)) < 1e-5


@pytest.mark.parametrize(("cls", "settings"), SOLVERS, ids=IDS)
def test_learned_variance_channels_are_split_off(cls: type, settings: dict) -> None:
    def with_variance(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([dummy_model(sample, t), torch.full_like(sample, 7.0)], dim=1)

    learned = cls(**DUMMY_CONFIG, variance_type="learned_range", **settings)
    expected = trajectory(cls(**DUMMY_CONFIG, **settings), dummy_model, dummy_sample(), 9)
    assert max_step_difference(trajectory(learned, with_variance, dummy_sample(), 9), expected) == 0
    x, t = dummy_sample(), learned.timesteps[0]
    learned.set_timesteps(9)
    with pytest.raises(ValueError, match=r"variance_type='learned_range' the model outputs 2 x 3 channels"):
        learned.step(dummy_model(x, t), t, x)
    plain = cls(**DUMMY_CONFIG, **settings)
    plain.set_timesteps(9)
    with pytest.raises(ValueError, match=r"shape \(4, 6, 8, 8\) differs .* needs variance_type='learned_range'"):
        plain.step(with_variance(x, t), t, x)


def test_learned_variance_equals_diffusers_dpm_solver_pp() -> None:
    def with_variance(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([dummy_model(sample, t), torch.full_like(sample, -3.0)], dim=1)

    dpm = DPMSolverMultistepScheduler(**DUMMY_CONFIG, variance_type="learned_range")
    hb = HeavyBallScheduler.from_config(dpm.config, sigma_spacing=None, beta=1.0)
    assert max_step_difference(trajectory(dpm, with_variance, dummy_sample(), 10),
                               trajectory(hb, with_variance, dummy_sample(), 10)) < 1e-5


@pytest.mark.parametrize("flag", ["use_exponential_sigmas", "use_lu_lambdas", "use_beta_sigmas"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_sigma_grid_flags_equal_diffusers_grids(flag: str, final: str) -> None:
    """diffusers' N + 1 sigmas of these grids are ours for N steps: the last model call is not wasted."""
    theirs = DPMSolverMultistepScheduler(**SD_SCHEDULE, **{flag: True}, final_sigmas_type=final)
    theirs.set_timesteps(11)
    ours = DeisScheduler.from_config(theirs.config)  # its default grid is quadratic_t: the flag replaces it
    direct = DeisScheduler(**SD_SCHEDULE, **{flag: True}, final_sigmas_type=final)
    for scheduler in (ours, direct):
        scheduler.set_timesteps(10)
        np.testing.assert_allclose(scheduler.rho[:-1], theirs.sigmas[:-2].double().numpy(), rtol=1e-6)
        assert scheduler.rho[-1] == (0.0 if final == "zero" else pytest.approx(float(theirs.sigmas[-1]), rel=1e-6))
        np.testing.assert_allclose(scheduler.vp_time.rho(scheduler.timesteps.double().numpy()),
                                   scheduler.rho[:-1], rtol=1e-12)  # called where it integrates


def test_lambda_min_clipped_equals_diffusers_on_integer_spacings_and_clips_every_grid() -> None:
    cosine = {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}
    for spacing in ("linspace", "leading", "trailing"):
        theirs = DPMSolverMultistepScheduler(**cosine, timestep_spacing=spacing)
        ours = HeavyBallScheduler.from_config(theirs.config, sigma_spacing=None)
        for steps in (10, 25, 50):
            theirs.set_timesteps(steps)
            ours.set_timesteps(steps)
            assert torch.equal(ours.timesteps, theirs.timesteps), (spacing, steps)
    theirs = DPMSolverMultistepScheduler(**cosine)
    theirs.set_timesteps(10)
    assert int(theirs.timesteps[0]) == 995  # the clip acts: t = 996 .. 999 have lambda < -5.1 (down to -9.9)
    for spacing in ("uniform_t", "quadratic_t", "log_snr", "karras", "beta"):
        scheduler = GhvbScheduler(**cosine, sigma_spacing=spacing)
        scheduler.set_timesteps(10)
        # rel 1e-4: rho is recomputed at the float32 timestep, and rho changes 30% per unit of t up there
        assert scheduler.rho[0] == pytest.approx(np.exp(5.1), rel=1e-4) and np.all(np.diff(scheduler.rho) < 0)
        assert scheduler.rho[0] < scheduler.vp_time.rho_max / 100


@pytest.mark.parametrize(("cls", "settings"), SOLVERS, ids=IDS)
def test_euler_at_final_makes_the_last_step_ddim(cls: type, settings: dict) -> None:
    common = {**DUMMY_CONFIG, "final_sigmas_type": "sigma_min", **settings}
    euler = cls(**common, euler_at_final=True)
    ends = trajectory(euler, dummy_model, dummy_sample().double(), 20)
    plain = trajectory(cls(**common), dummy_model, dummy_sample().double(), 20)
    assert all(torch.equal(a, b) for a, b in zip(ends[:-1], plain[:-1], strict=True))  # only the last step changes
    rho, t = euler.rho, euler.timesteps
    alpha = 1 / np.sqrt(1 + rho**2)
    ddim = alpha[20] * (ends[19] / alpha[19] + (rho[20] - rho[19]) * dummy_model(ends[19], t[19]))
    assert torch.allclose(ends[20], ddim, rtol=0, atol=1e-12)
    assert float((plain[20] - ddim).abs().max()) > 1e-6  # without the flag the last step is higher order


def test_euler_at_final_equals_diffusers_dpm_solver_pp() -> None:
    dpm = DPMSolverMultistepScheduler(**DUMMY_CONFIG, euler_at_final=True, final_sigmas_type="sigma_min")
    hb = HeavyBallScheduler.from_config(dpm.config, sigma_spacing=None, beta=1.0)
    assert hb.config.euler_at_final
    assert max_step_difference(trajectory(dpm, dummy_model, dummy_sample(), 20),
                               trajectory(hb, dummy_model, dummy_sample(), 20)) < 1e-5


def _diffusers_calls(theirs: DPMSolverMultistepScheduler, ours: GhvbScheduler, steps: int) -> list[int]:
    """diffusers' timesteps as we call them: its first ``steps`` (its trailing rule can overshoot to a
    step ``steps + 1`` at t = -1), inside [0, T - 1], once each, above the final noise level."""
    ts = np.clip(theirs.timesteps.numpy()[:steps], 0, 999)
    _, first = np.unique(ts, return_index=True)
    ts = ts[np.sort(first)]
    return ts[ours.vp_time.rho(ts) > ours.rho[-1]].tolist()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """diffusers' set_timesteps runs a 1000-element torch pow; with 2 threads on a busy machine each
    call waits ~15 ms on thread wake-ups, with one it takes microseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("spacing", "offset"), [("linspace", 0), ("leading", 0), ("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_every_step_count_diffusers_takes_gives_a_sane_grid(spacing: str, offset: int, final: str) -> None:
    """1..1000 steps: ours takes every count diffusers' DPM-Solver takes (trailing with 667 or more
    steps reaches t = 0, where "sigma_min" ends: that call is dropped, no step would follow it)."""
    config = {"timestep_spacing": spacing, "steps_offset": offset, "final_sigmas_type": final}
    theirs = DPMSolverMultistepScheduler(**config)
    ours = GhvbScheduler(**config, sigma_spacing=None)
    for steps in range(1, 1001):
        theirs.set_timesteps(steps)
        if spacing == "leading" and offset == 0 and final == "sigma_min" and steps == 1000:
            # every step on t = 0 (diffusers' own loop fails there with an IndexError)
            with pytest.raises(ValueError, match="all fall on timestep 0, where final_sigmas_type='sigma_min'"):
                ours.set_timesteps(steps)
            continue
        ours.set_timesteps(steps)
        assert ours.timesteps.dtype == torch.int64 and ours.timesteps.tolist() == _diffusers_calls(theirs, ours,
                                                                                                    steps), steps
        assert np.all(np.diff(ours.rho) < 0) and ours.rho[0] <= ours.vp_time.rho_max, steps
        assert ours.rho[-1] == (0.0 if final == "zero" else ours.vp_time.rho_min)
    ours.set_timesteps(667)
    if spacing == "trailing":
        assert ours.num_inference_steps == (667 if final == "zero" else 666) and int(ours.timesteps[-1]) == (
            0 if final == "zero" else 2)


@pytest.mark.parametrize("spacing", ["uniform_t", "quadratic_t", "log_snr", "karras", "beta"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_every_step_count_on_noise_level_grids_is_sane(spacing: str, final: str) -> None:
    ours = GhvbScheduler(**SD_SCHEDULE, sigma_spacing=spacing, final_sigmas_type=final)
    for steps in [*range(1, 1001, 37), 999, 1000]:
        ours.set_timesteps(steps)
        assert ours.num_inference_steps == steps and np.all(np.diff(ours.rho) < 0), steps
        assert ours.rho[0] == pytest.approx(ours.vp_time.rho_max, rel=1e-6)
