"""The one denoising loop on the exact `gmm` oracle: convergence to the exact ODE endpoint."""

from __future__ import annotations

import numpy as np
import torch

from accel_diffusion.engine.conditioning import Conditioning
from accel_diffusion.engine.hooks import LoopCounters
from accel_diffusion.engine.loop import denoise
from accel_diffusion.eval.gmm_metrics import endpoint_error, observed_order
from accel_diffusion.guidance.none import NoGuidance
from accel_diffusion.models.gmm import load_gmm_pipeline, pf_ode_endpoint
from accel_diffusion.registry import get_registry


def test_ddim_through_the_loop_converges_at_first_order() -> None:
    pipe = load_gmm_pipeline()
    denoiser = pipe.denoiser
    x_T = torch.randn(400, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rho_start = float(denoiser.timestep_to_rho(999))
    rho_end = float(denoiser.timestep_to_rho(0))  # DDIM's last step lands on alphas_cumprod[0]
    exact = np.asarray(pf_ode_endpoint(denoiser.mixture, x_T.numpy(), rho_start, rho_end))
    ns, errors = [10, 20, 40, 80], []
    for n in ns:
        scheduler = get_registry().build("sampler", "ddim").make_scheduler(
            dict(pipe.scheduler.config), {"timestep_spacing": "trailing"})
        scheduler.set_timesteps(n)
        assert int(scheduler.timesteps[0]) == 999
        counters = LoopCounters()
        x = denoise(denoiser, x_T.clone(), scheduler, scheduler.timesteps, NoGuidance(),
                    Conditioning({"cond": {}}), counters=counters)
        assert counters.nfe == n and counters.forward_passes == n
        errors.append(endpoint_error(x.numpy(), exact)["mean"])
    assert errors == sorted(errors, reverse=True)
    assert abs(observed_order(ns, errors) - 1.0) < 0.3, errors
    assert errors[-1] < 0.05


def test_gmm_pipeline_uses_the_loop_and_recovers_mode_weights() -> None:
    pipe = load_gmm_pipeline()
    pipe.scheduler = get_registry().build("sampler", "ddim").make_scheduler(
        dict(pipe.scheduler.config), {"timestep_spacing": "trailing"})
    samples = pipe(batch_size=4000, num_inference_steps=100, generator=torch.Generator().manual_seed(1)).samples
    from accel_diffusion.eval.gmm_metrics import mode_weight_error

    assert mode_weight_error(samples, pipe.denoiser.mixture) < 0.03
