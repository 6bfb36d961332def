"""What each built-in component name means: references, golden values and one run on the `gmm` oracle.

Shared by the tests that pin every name `accel-diffusion strategies` lists (tests/samplers, tests/schedules,
tests/test_registry.py). References are written out here, never taken from the code under test.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
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
    "ddpm": ({"name": "ddpm"}, DDPMScheduler, {"clip_sample": False, "variance_type": "fixed_small"}, {}),
    "ddpm_large": ({"name": "ddpm", "variance": "fixed_large"}, DDPMScheduler,
                   {"clip_sample": False, "variance_type": "fixed_large"}, {}),
}
# step noise: both runs get the same seeded generator
STOCHASTIC = {"ddim_eta1", "euler_ancestral", "lcm", "ddpm", "ddpm_large"}

# final |x| mean and x[0] after STEPS steps from gmm_noise(), spacing "model"; recorded with diffusers 0.42.1
GOLDEN: dict[str, tuple[float, list[float]]] = {
    "ddim": (0.9968092061173752, [-2.08444284782001, -0.21645298465733084]),
    "ddim_eta1": (0.9288917513799203, [-0.048088442384670735, -1.866525208007523]),
    # DDPM's ancestral step is Euler-ancestral's (same seed: equal to 1e-7)
    "ddpm": (0.9312247080851774, [-0.044798275869037056, -1.8629507746052574]),
    "ddpm_large": (1.074421799292088, [-0.21615700318604175, -2.1401546556227804]),
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


# schedules of an AR model's diffusion head (no timesteps of their own): name -> where their values are pinned
AR_SCHEDULE_PINS = {"disa": "tests/schedules/test_disa.py: step plans per AR iteration, the spec's cost table"}

def schedule_labels(prefix: str) -> list[str]:
    return sorted(label for label in SCHEDULE_PINS if label.startswith(prefix))


# ---- guidance ----------------------------------------------------------------------------------------------
# Each guidance name (cfg, apg, rcfg in each variant, none) against a reference written out below from the formulas
# (Ho & Salimans; Lin et al. 2023 §3.4; Sadat et al. 2025, APG Algorithm 1, /work/shared/specs/samplers.md §3.1;
# StreamDiffusion's RCFG, specs/students-parallel-stream.md §5.2), in float64 numpy on fixed tensors, step after
# step with the component's own state (momentum, RCFG's reference latent). The noise levels come from SD's
# scaled_linear betas written out here, not from the code under test.

# label -> (component spec, prediction type, img2img, the branches each step evaluates)
U, C = "uncond", "cond"
GUIDANCE_PINS: dict[str, tuple[dict[str, Any], str, bool, list[tuple[str, ...]]]] = {
    "none": ({"name": "none"}, "epsilon", False, [(C,)] * 3),
    "cfg": ({"name": "cfg"}, "epsilon", False, [(U, C)] * 3),
    "cfg-scale0.5": ({"name": "cfg", "scale": 0.5}, "epsilon", False, [(U, C)] * 3),
    "cfg-scale1": ({"name": "cfg", "scale": 1.0}, "epsilon", False, [(C,)] * 3),
    "cfg-rescale-v": ({"name": "cfg", "scale": 9.0, "rescale": 0.7}, "v_prediction", False, [(U, C)] * 3),
    "cfg-window": ({"name": "cfg", "scale": 4.0, "start": 0.2, "stop": 0.7}, "epsilon", False,
                   [(C,)] * 2 + [(U, C)] * 5 + [(C,)] * 3),  # int(0.2 * 10) <= i < int(0.7 * 10)
    "apg": ({"name": "apg"}, "epsilon", False, [(U, C)] * 3),
    "apg-threshold-inactive": ({"name": "apg", "scale": 5.0, "norm_threshold": 50.0}, "epsilon", False, [(U, C)] * 3),
    "apg-eta-momentum-v": ({"name": "apg", "scale": 12.0, "eta": 0.3, "norm_threshold": 0.05, "momentum": 0.25},
                           "v_prediction", False, [(U, C)] * 3),
    "apg-model_output-l2": ({"name": "apg", "scale": 6.0, "eta": -0.5, "norm_threshold": 3.0, "momentum": -0.75,
                             "space": "model_output", "norm": "l2"}, "epsilon", False, [(U, C)] * 3),
    "apg-cfg-limit": ({"name": "apg", "scale": 7.5, "eta": 1.0, "norm_threshold": 0.0, "momentum": 0.0},
                      "epsilon", False, [(U, C)] * 3),
    "rcfg-self": ({"name": "rcfg"}, "epsilon", True, [(C,)] * 3),
    "rcfg-self-delta-v": ({"name": "rcfg", "scale": 2.5, "delta": 0.6, "variant": "self"}, "v_prediction", True,
                          [(C,)] * 3),
    "rcfg-onetime": ({"name": "rcfg", "scale": 3.0, "delta": 0.8, "variant": "onetime"}, "epsilon", False,
                     [(U, C)] + [(C,)] * 2),
    "rcfg-onetime-v": ({"name": "rcfg", "scale": 1.5, "variant": "onetime"}, "v_prediction", True,
                       [(U, C)] + [(C,)] * 2),
    "rcfg-scale1": ({"name": "rcfg", "scale": 1.0, "variant": "onetime"}, "epsilon", False, [(C,)] * 3),
}
GUIDANCE_TIMESTEPS = [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]

# the normalized spec of each name at its defaults: what a bare name means
GUIDANCE_DEFAULTS: dict[str, dict[str, Any]] = {
    "none": {"name": "none"},
    "cfg": {"name": "cfg", "scale": 7.5, "rescale": 0.0, "start": 0.0, "stop": 1.0},
    "apg": {"name": "apg", "scale": 7.5, "eta": 0.0, "norm_threshold": 0.01, "momentum": -0.5, "space": "x0",
            "norm": "rms"},
    "rcfg": {"name": "rcfg", "scale": 1.2, "delta": 1.0, "variant": "self"},
}


# per step: summary() of guidance_reference(label), recorded as literals (torch 2.13's seeded randn inputs)
GUIDANCE_GOLDEN: dict[str, list[tuple[float, list[float]]]] = {
    "none": [
        (0.7869099789495522, [0.8861799836158752, -0.0432794988155365, -0.05652383714914322]),
        (0.7946937870302122, [0.7530519962310791, -0.9582028985023499, -1.6534523963928223]),
        (0.7407932468897798, [1.749704360961914, -0.5761825442314148, 0.2840940058231354]),
    ],
    "cfg": [
        (3.0430085900543418, [-2.5313266217708588, -1.6645829305052757, 1.4337571449577808]),
        (3.08773332473109, [0.8687436878681183, 0.5698058903217316, -6.48573899269104]),
        (3.0832031148405576, [-6.538051962852478, 4.717458635568619, 0.4781120717525482]),
    ],
    "cfg-scale0.5": [
        (0.8224284654288567, [1.1490651071071625, 0.0814361497759819, -0.17116083577275276]),
        (0.8447395067794616, [0.7441526353359222, -1.0757420361042023, -1.281738042831421]),
        (0.7631342763419298, [2.3872240781784058, -0.9833857119083405, 0.26916953921318054]),
    ],
    "cfg-scale1": [
        (0.7869099789495522, [0.8861799836158752, -0.0432794988155365, -0.05652383714914322]),
        (0.7946937870302122, [0.7530519962310791, -0.9582028985023499, -1.6534523963928223]),
        (0.7407932468897798, [1.749704360961914, -0.5761825442314148, 0.2840940058231354]),
    ],
    "cfg-rescale-v": [
        (1.6529750088424144, [-1.4877319514063934, -0.9135843460336259, 0.7965988063446636]),
        (1.6897179473409984, [0.41291519049031206, 0.4253571884278241, -3.5049958179005953]),
        (1.6329799662457665, [-3.7015757643789193, 2.6014580942091063, 0.2290367126034023]),
    ],
    "cfg-window": [
        (0.7869099789495522, [0.8861799836158752, -0.0432794988155365, -0.05652383714914322]),
        (0.7946937870302122, [0.7530519962310791, -0.9582028985023499, -1.6534523963928223]),
        (1.5875954628691034, [-2.075413942337036, 1.8670364618301392, 0.3736408054828644]),
        (1.6789027744107443, [-0.30246472358703613, -0.2555201053619385, -4.429107308387756]),
        (1.583982151602612, [-1.7080706357955933, 0.5424376726150513, 0.8331747055053711]),
        (1.6105093876785759, [-4.342914402484894, 0.005257844924926758, 2.1889065504074097]),
        (1.5688142087292363, [-3.376154065132141, 3.5594632625579834, -0.15577054023742676]),
        (0.7851159347962948, [-1.5643104314804077, -1.023897647857666, 1.6565769910812378]),
        (0.7904187105789333, [-1.0312894582748413, -0.00045947020407766104, -1.2205499410629272]),
        (0.7948385972256347, [1.8199254274368286, -0.7651808261871338, 0.7978824973106384]),
    ],
    "apg": [
        (0.7867193548688557, [0.8794793415321569, -0.047797656850134713, -0.053823689096279874]),
        (0.7944965141703217, [0.7614302363108509, -0.9500085900292143, -1.670863908225032]),
        (0.7427300631073981, [1.705666106852351, -0.5625499423750991, 0.3039920028747114]),
    ],
    "apg-threshold-inactive": [
        (1.946392588560039, [-1.0509119194990153, -1.34943601881239, 0.7240632864524075]),
        (2.42562981579385, [2.54595960935396, 0.7953441359438865, -5.379441604474698]),
        (2.710551960011049, [-4.830777503138153, 1.4608893399716936, 3.2573819205540495]),
    ],
    "apg-eta-momentum-v": [
        (0.8952758618187631, [0.41287131582911263, -0.3010673501692779, 0.16365116218791945]),
        (0.9016073748943887, [0.6498155692907468, -0.8009983815202133, -2.3239369176147564]),
        (0.870195719049266, [0.572787921455439, 0.2006786476596156, 0.1528595550307223]),
    ],
    "apg-model_output-l2": [
        (1.0817611806817284, [0.17172667986560164, -0.469053005379673, 0.3168078842473979]),
        (1.0955579157125737, [1.335568471451862, -0.3465384431865468, -2.947460225718423]),
        (1.0270443973836678, [-0.5122717739709932, 0.1371456183318931, 1.2036888774620484]),
    ],
    "apg-cfg-limit": [
        (3.0430085900543418, [-2.5313266217708583, -1.6645829305052766, 1.4337571449577802]),
        (3.08773332473109, [0.8687436878681194, 0.5698058903217319, -6.485738992691039]),
        (3.0832031148405576, [-6.538051962852479, 4.7174586355686206, 0.4781120717525481]),
    ],
    "rcfg-self": [
        (0.9794387619430236, [1.0450045271912194, -0.3881298433939451, -0.16402951613163214]),
        (0.9770237734842122, [1.0381448885942013, -1.2281690417867737, -1.8678907030417815]),
        (0.8997562481623689, [2.104436110387423, -1.1262069094938774, 0.33082533795466323]),
    ],
    "rcfg-self-delta-v": [
        (4.062736751063387, [3.111877572664598, 4.179570221566418, 3.2893635783469746]),
        (3.085936635903362, [0.40596009777569436, -5.169841282068018, -4.726303039364906]),
        (2.4573664614381268, [4.764728441775773, -1.6148622858929234, 1.8338985250986726]),
    ],
    "rcfg-onetime": [
        (1.2978988072180073, [0.3994195818901063, -0.45968137383461005, 0.2877050235867501]),
        (4.152583134249426, [-0.11613354566748146, 0.35502808185869794, -2.0253668695163825]),
        (5.582730177784956, [-0.005552923027784651, 0.7074277434051837, 3.8465889667900393]),
    ],
    "rcfg-onetime-v": [
        (0.8114677004077748, [0.6232948601245882, -0.16799514740705396, 0.05811316147446673]),
        (1.2705306556974105, [0.4817368196958328, -1.4480443585189642, -2.259570314522319]),
        (1.1987368447715898, [1.891396851025256, -1.0854597348249666, 0.5708753856020973]),
    ],
    "rcfg-scale1": [
        (0.7869099789495522, [0.8861799836158752, -0.0432794988155365, -0.05652383714914322]),
        (0.7946937870302122, [0.7530519962310791, -0.9582028985023499, -1.6534523963928223]),
        (0.7407932468897798, [1.749704360961914, -0.5761825442314148, 0.2840940058231354]),
    ],
}


def sd_alpha_sigma(timestep: int) -> tuple[float, float]:
    """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) of SD's noise process (scaled_linear betas 0.00085 .. 0.012)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    alpha_bar = float(np.cumprod(1.0 - betas)[timestep])
    return alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5


def guidance_inputs(label: str, k: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step k's x_t and branch predictions (fixed seeded tensors, batch 2 of 4x8x8)."""
    g = torch.Generator().manual_seed(100 + k)
    x_t = torch.randn(2, 4, 8, 8, generator=g)
    cond = torch.randn(2, 4, 8, 8, generator=g)
    return x_t, {C: cond, U: cond + 0.6 * torch.randn(2, 4, 8, 8, generator=g)}


def guidance_init_latents() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(99))


def guidance_run(label: str) -> list[tuple[tuple[str, ...], torch.Tensor]]:
    """The component as the registry builds it, step after step: (branches it asked for, its output)."""
    from diffusers import DDIMScheduler

    from accel_diffusion.engine.step import StepContext

    spec, prediction_type, img2img, expected = GUIDANCE_PINS[label]
    guidance = get_registry().build("guidance", spec)
    guidance.begin(guidance_init_latents() if img2img else None)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, clip_sample=False)
    runs = []
    for k in range(len(expected)):
        x_t, predictions = guidance_inputs(label, k)
        step = StepContext(k, len(expected), torch.tensor(GUIDANCE_TIMESTEPS[k]), x_t, x_t, scheduler,
                           prediction_type)
        branches = guidance.branches(step)
        runs.append((branches, guidance.combine({b: predictions[b] for b in branches}, step)))
    return runs


def _per_sample_norm(a: np.ndarray) -> np.ndarray:
    return np.sqrt((a**2).reshape(a.shape[0], -1).sum(axis=1)).reshape(-1, *([1] * (a.ndim - 1)))


def _conversions(x: np.ndarray, a: float, s: float, v_model: bool) -> tuple[Any, Any, Any, Any]:
    """x_t = a x0 + s eps (v = a eps - s x0): model output -> x0, -> eps; x0 -> output, eps -> output."""

    def to_x0(out: np.ndarray) -> np.ndarray:
        return a * x - s * out if v_model else (x - s * out) / a

    def to_eps(out: np.ndarray) -> np.ndarray:
        return s * x + a * out if v_model else out

    def from_x0(x0: np.ndarray) -> np.ndarray:
        eps = (x - a * x0) / s
        return a * eps - s * x0 if v_model else eps

    def from_eps(eps: np.ndarray) -> np.ndarray:
        return a * eps - s * (x - s * eps) / a if v_model else eps

    return to_x0, to_eps, from_x0, from_eps


def guidance_reference(label: str) -> list[np.ndarray]:
    """The outputs the name promises on guidance_inputs, from the formulas (float64)."""
    spec, prediction_type, img2img, expected = GUIDANCE_PINS[label]
    params = {k: v for k, v in GUIDANCE_DEFAULTS[spec["name"]].items() if k != "name"} | {
        k: v for k, v in spec.items() if k != "name"}
    v_model = prediction_type == "v_prediction"
    momentum_buffer = None
    reference_x0 = guidance_init_latents().double().numpy() if img2img and params.get("variant") == "self" else None
    outputs = []
    for k, branches in enumerate(expected):
        x_t, predictions = guidance_inputs(label, k)
        x = x_t.double().numpy()
        cond, uncond = predictions[C].double().numpy(), predictions[U].double().numpy()
        a, s = sd_alpha_sigma(GUIDANCE_TIMESTEPS[k])

        to_x0, to_eps, from_x0, from_eps = _conversions(x, a, s, v_model)
        name = spec["name"]
        if branches == (C,) and name != "rcfg":  # no negative evaluation: the conditional prediction
            outputs.append(cond)
            continue
        if name == "cfg":
            w = params["scale"]
            guided = uncond + w * (cond - uncond)
            if params["rescale"] > 0:  # Lin et al. (16): std(cond) / std(guided), mixed by phi
                std = lambda t: t.reshape(t.shape[0], -1).std(axis=1).reshape(-1, 1, 1, 1)  # noqa: E731
                guided = params["rescale"] * guided * std(cond) / std(guided) + (1 - params["rescale"]) * guided
            outputs.append(guided)
        elif name == "apg":
            x0_space = params["space"] == "x0"
            d_c, d_u = (to_x0(cond), to_x0(uncond)) if x0_space else (cond, uncond)
            delta = d_c - d_u
            if params["momentum"] != 0:  # M_t = delta_t + beta M_{t-1}, M_{-1} = 0
                momentum_buffer = delta + params["momentum"] * (0 if momentum_buffer is None else momentum_buffer)
                delta = momentum_buffer
            r = params["norm_threshold"]
            if r > 0:
                size = _per_sample_norm(delta) / (np.sqrt(delta[0].size) if params["norm"] == "rms" else 1.0)
                delta = delta * np.minimum(1.0, r / size)
            parallel = (delta * d_c).reshape(2, -1).sum(1).reshape(-1, 1, 1, 1) / _per_sample_norm(d_c) ** 2 * d_c
            guided = d_c + (params["scale"] - 1) * ((delta - parallel) + params["eta"] * parallel)
            outputs.append(from_x0(guided) if x0_space else guided)
        elif name == "rcfg":
            gamma, dl = params["scale"], params["delta"]
            if gamma == 1.0:
                outputs.append(cond)
                continue
            eps_c = to_eps(cond)
            if U in branches:  # onetime: the negative prediction is the residual noise; X its x0
                eps_bar = to_eps(uncond)
                reference_x0 = to_x0(uncond)
            else:
                eps_bar = (x - a * reference_x0) / s
            outputs.append(from_eps(dl * eps_bar + gamma * (eps_c - dl * eps_bar)))
        else:
            raise AssertionError(f"no reference for {name!r}")
    return outputs


def summary(output: np.ndarray | torch.Tensor) -> tuple[float, list[float]]:
    """(mean |out|, out[0, 0, 0, :3]): the golden values of one step."""
    values = np.asarray(output, dtype=np.float64)
    return float(np.abs(values).mean()), [float(v) for v in values[0, 0, 0, :3]]
