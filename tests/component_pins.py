"""What each built-in component name means: references, golden values and one run on the `gmm` oracle.

Shared by the tests that pin every name `accel-diffusion strategies` lists (tests/samplers, tests/schedules,
tests/test_registry.py). References are written out here, never taken from the code under test.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)

from accel_diffusion.engine.conditioning import Conditioning
from accel_diffusion.engine.loop import denoise
from accel_diffusion.guidance.none import NoGuidance
from accel_diffusion.models.gmm import load_gmm_pipeline
from accel_diffusion.registry import get_registry

STEPS = 8
# the shipped gmm model's noise process, written out (its scheduler_config.json): SD's betas, leading spacing
NOISE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "trained_betas": None, "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading",
         "rescale_betas_zero_snr": False}

# name -> (component spec, diffusers class, the solver settings the name promises, scheduler.step kwargs)
REFERENCES: dict[str, tuple[dict[str, Any], type, dict[str, Any], dict[str, Any]]] = {
    "ddim": ({"name": "ddim"}, DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False}, {"eta": 0.0}),
    "ddim_eta1": ({"name": "ddim", "eta": 1.0}, DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False},
                  {"eta": 1.0}),
    "euler": ({"name": "euler"}, EulerDiscreteScheduler, {}, {}),
    "euler_ancestral": ({"name": "euler", "ancestral": True}, EulerAncestralDiscreteScheduler, {}, {}),
    "dpmpp_2m": ({"name": "dpmpp_2m"}, DPMSolverMultistepScheduler,
                 {"solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                  "lower_order_final": True, "final_sigmas_type": "zero", "thresholding": False}, {}),
    "dpmpp_3m": ({"name": "dpmpp_2m", "order": 3}, DPMSolverMultistepScheduler,
                 {"solver_order": 3, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                  "lower_order_final": True, "final_sigmas_type": "zero", "thresholding": False}, {}),
    "unipc": ({"name": "unipc"}, UniPCMultistepScheduler,
              {"solver_order": 2, "solver_type": "bh2", "predict_x0": True, "thresholding": False}, {}),
    "diffusers_deis": ({"name": "diffusers_deis"}, DEISMultistepScheduler,
                       {"solver_order": 2, "algorithm_type": "deis", "solver_type": "logrho",
                        "thresholding": False}, {}),
    "lcm": ({"name": "lcm"}, LCMScheduler,
            {"original_inference_steps": 50, "clip_sample": False, "set_alpha_to_one": False}, {}),
}
STOCHASTIC = {"ddim_eta1", "euler_ancestral", "lcm"}  # step noise: both runs get the same seeded generator

# final |x| mean and x[0] after STEPS steps from gmm_noise(), spacing "model"; recorded with diffusers 0.42.1
GOLDEN: dict[str, tuple[float, list[float]]] = {
    "ddim": (0.9968092061173752, [-2.08444284782001, -0.21645298465733084]),
    "ddim_eta1": (0.9288917513799203, [-0.048088442384670735, -1.866525208007523]),
    "diffusers_deis": (1.0476057273411743, [-2.092549206189763, -0.19262222655774655]),
    "dpmpp_2m": (1.0512851331168858, [-2.0530401963234652, -0.17384959615189885]),
    "dpmpp_3m": (1.0578452797073814, [-2.053031003332551, -0.17079014924723]),
    "euler": (0.9971786857669209, [-2.078740156820609, -0.2136840084652161]),
    "euler_ancestral": (0.9312247585206925, [-0.04479827950031018, -1.862950748307009]),
    "lcm": (0.8691015580180657, [-1.2631206145367682, -1.4337428652913808]),
    "unipc": (1.0579467810964271, [-2.053478559310101, -0.1688363680492381]),
}


# schedule spec -> (the sampler it runs with, the timesteps it must visit in STEPS steps on gmm (literals), the
# independent diffusers reference as (options for reference(sampler), set_timesteps kwargs), or None: no diffusers twin)
SCHEDULE_PINS: dict[str, tuple[dict[str, Any], str, list[float], tuple[dict[str, Any], dict[str, Any]] | None]] = {
    "spacing-model": ({"name": "spacing"}, "dpmpp_2m", [889, 778, 667, 556, 445, 334, 223, 112],
                      ({}, {"num_inference_steps": STEPS})),
    "spacing-leading": ({"name": "spacing", "spacing": "leading"}, "dpmpp_2m",
                        [889, 778, 667, 556, 445, 334, 223, 112],
                        ({"timestep_spacing": "leading"}, {"num_inference_steps": STEPS})),
    "spacing-trailing": ({"name": "spacing", "spacing": "trailing"}, "dpmpp_2m",
                         [999, 874, 749, 624, 499, 374, 249, 124],
                         ({"timestep_spacing": "trailing"}, {"num_inference_steps": STEPS})),
    "spacing-linspace": ({"name": "spacing", "spacing": "linspace"}, "dpmpp_2m",
                         [999, 874, 749, 624, 500, 375, 250, 125],
                         ({"timestep_spacing": "linspace"}, {"num_inference_steps": STEPS})),
    # N + 1 = 9 noise levels from t = 999 to 0, the model called at the first 8: uniform in t, in sqrt(t), in log rho
    "spacing-uniform_t": ({"name": "spacing", "spacing": "uniform_t"}, "deis",
                          [999 * (1 - i / 8) for i in range(8)], None),
    "spacing-quadratic_t": ({"name": "spacing", "spacing": "quadratic_t"}, "deis",
                            [999 * (1 - i / 8) ** 2 for i in range(8)], None),
    "spacing-log_snr": ({"name": "spacing", "spacing": "log_snr"}, "deis",
                        [999.0, 857.521545, 680.666931, 460.56546, 233.209274, 80.819366, 20.001921, 3.675575], None),
    "karras": ({"name": "karras"}, "dpmpp_2m", [999, 890, 746, 549, 299, 90, 12, 0],
               ({"use_karras_sigmas": True}, {"num_inference_steps": STEPS})),
    "karras-rho3": ({"name": "karras", "rho": 3.0}, "deis",
                    [999.0, 939.332397, 865.028564, 768.457886, 636.189392, 448.467285, 210.609909, 36.766853], None),
    "timesteps": ({"name": "timesteps", "timesteps": [999, 800, 600, 400, 200, 1]}, "dpmpp_2m",
                  [999, 800, 600, 400, 200, 1], ({}, {"timesteps": [999, 800, 600, 400, 200, 1]})),
    # the artifact of tests/searched_fixtures.py (a real search on this oracle): its timesteps, as diffusers runs them
    "searched": ({"name": "searched", "id": "gmm-dpmpp_2m-4"}, "dpmpp_2m", [823, 488, 438, 63],
                 ({}, {"timesteps": [823, 488, 438, 63]})),
}

# accel-diffusion's own samplers at their defaults (spacing "model": their own grids), through the engine's loop;
# no diffusers twin exists at these settings (tests/schedulers pins their special cases against diffusers)
OWN_GOLDEN: dict[str, tuple[float, list[float]]] = {
    "deis": (1.0542734343395892, [-2.1210794930717762, -0.21587816778202737]),
    "hb": (1.025814042804308, [-2.1511306620400785, -0.2477132064959955]),
    "ghvb": (1.089093887610769, [-2.190547496385483, -0.23852929298510983]),
}


@functools.cache
def _gmm() -> Any:
    return load_gmm_pipeline()


def gmm_denoiser() -> torch.nn.Module:
    return _gmm().denoiser


def model_scheduler_config() -> dict[str, Any]:
    return dict(_gmm().scheduler.config)


def reference(name: str, **options: Any) -> Any:
    """The diffusers scheduler ``name`` promises, built here from the written-out config (plus ``options``)."""
    _, cls, settings, _ = REFERENCES[name]
    noise = dict(NOISE)
    if cls is DEISMultistepScheduler:  # diffusers' DEIS has no zero-terminal-SNR option
        del noise["rescale_betas_zero_snr"]
    return cls(**noise | options, **settings)


def initial_noise() -> torch.Tensor:
    return torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def reference_run(name: str, scheduler: Any = None, **set_timesteps: Any) -> torch.Tensor:
    """The reference scheduler (or ``scheduler``) driven by the test's own loop (diffusers' documented loop)."""
    scheduler = scheduler if scheduler is not None else reference(name)
    step_kwargs = dict(REFERENCES[name][3])
    if name in STOCHASTIC:
        step_kwargs["generator"] = torch.Generator().manual_seed(5)
    scheduler.set_timesteps(**set_timesteps or {"num_inference_steps": STEPS})
    x = initial_noise() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = gmm_denoiser()(scheduler.scale_model_input(x, t), t).sample
        x = scheduler.step(eps, t, x, **step_kwargs, return_dict=False)[0]
    return x


def engine_run(sampler_spec: dict[str, Any], schedule_spec: dict[str, Any] | None = None,
               seed: int | None = None) -> tuple[Any, torch.Tensor]:
    """(scheduler, final x): the components as the engine builds them, through the engine's own loop."""
    registry = get_registry()
    sampler = registry.build("sampler", sampler_spec)
    schedule = registry.build("schedule", schedule_spec or {"name": "spacing"})
    scheduler = sampler.make_scheduler(model_scheduler_config(), schedule.scheduler_options())
    schedule.check_compatible(scheduler, sampler_spec["name"])
    schedule.set_timesteps(scheduler, schedule.num_steps(STEPS), torch.device("cpu"))
    step_kwargs = sampler.step_kwargs()
    if seed is not None:
        step_kwargs["generator"] = torch.Generator().manual_seed(seed)
    x = initial_noise() * scheduler.init_noise_sigma
    return scheduler, denoise(gmm_denoiser(), x, scheduler, scheduler.timesteps, NoGuidance(),
                              Conditioning({"cond": {}}), step_kwargs=step_kwargs)


def component_run(name: str) -> torch.Tensor:
    return engine_run(REFERENCES[name][0], seed=5 if name in STOCHASTIC else None)[1]


def check_schedule_pin(label: str) -> None:
    """The schedule visits the pinned timesteps; where diffusers has a twin, timesteps, sigmas and the run equal it."""
    schedule_spec, sampler_name, timesteps, diffusers_twin = SCHEDULE_PINS[label]
    scheduler, ours = engine_run({"name": sampler_name}, schedule_spec)
    assert [float(t) for t in scheduler.timesteps] == pytest.approx(timesteps, abs=1e-4)
    if diffusers_twin is None:
        return
    options, set_timesteps = diffusers_twin
    twin = reference(sampler_name, **options)
    theirs = reference_run(sampler_name, twin, **set_timesteps)
    assert torch.equal(scheduler.timesteps, twin.timesteps)
    assert torch.equal(scheduler.sigmas, twin.sigmas)
    assert torch.equal(ours, theirs)


def schedule_labels(prefix: str) -> list[str]:
    return sorted(label for label in SCHEDULE_PINS if label.startswith(prefix))
