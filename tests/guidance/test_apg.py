"""APG: CFG limit, projection and rescale invariants, momentum, diffusers parity, space and resolution."""

from __future__ import annotations

import torch
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance
from guidance_steps import predictions, step_context

from accel_diffusion.guidance.apg import ApgGuidance
from accel_diffusion.guidance.cfg import CfgGuidance


def test_eta_one_without_threshold_or_momentum_is_exactly_cfg() -> None:
    for prediction_type in ("epsilon", "v_prediction"):
        step, preds = step_context(prediction_type), predictions()
        for space in ("x0", "model_output"):
            apg = ApgGuidance(scale=7.0, eta=1.0, norm_threshold=0.0, momentum=0.0, space=space)
            apg.begin(None)
            cfg = CfgGuidance(scale=7.0).combine(preds, step)
            assert torch.allclose(apg.combine(preds, step), cfg, atol=2e-5), (prediction_type, space)


def test_projection_and_rescale_invariants() -> None:
    preds = predictions()
    cond, uncond = preds["cond"].double(), preds["uncond"].double()
    delta = cond - uncond
    apg = ApgGuidance(scale=2.0, eta=0.0, norm_threshold=0.0, momentum=0.0)
    perp = (apg.guide(cond, uncond) - cond) / (2.0 - 1.0)  # (w - 1) * delta_perp with w = 2
    dims = (1, 2, 3)

    def norm(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).norm(dim=1)

    assert ((perp * cond).sum(dims).abs() / (norm(perp) * norm(cond)) < 1e-10).all()
    parallel = delta - perp
    cosine = (parallel * cond).sum(dims) / (norm(parallel) * norm(cond))
    assert torch.allclose(cosine.abs(), torch.ones_like(cosine), atol=1e-10)
    eta_one = ApgGuidance(scale=2.0, eta=1.0, norm_threshold=0.0, momentum=0.0).guide(cond, uncond)
    assert torch.allclose(eta_one - cond, delta, atol=1e-12)  # delta_perp + delta_par = delta
    # rescale: a small threshold clamps the update's RMS to r; a large one leaves it alone
    clamped = ApgGuidance(scale=2.0, eta=1.0, norm_threshold=0.05, momentum=0.0).guide(cond, uncond) - cond
    rms = norm(clamped) / cond[0].numel() ** 0.5
    assert torch.allclose(rms, torch.full_like(rms, 0.05), atol=1e-9)
    loose = ApgGuidance(scale=2.0, eta=1.0, norm_threshold=100.0, momentum=0.0).guide(cond, uncond)
    assert torch.allclose(loose, eta_one, atol=1e-12)


def test_momentum_accumulates_and_resets_per_generation() -> None:
    apg = ApgGuidance(scale=2.0, eta=1.0, norm_threshold=0.0, momentum=-0.5)
    deltas = [torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(s)).double() for s in range(3)]
    cond = torch.ones(1, 4, 4, 4, dtype=torch.float64)
    apg.begin(None)
    outputs = [apg.guide(cond, cond - d) - cond for d in deltas]
    expected = [deltas[0], deltas[1] - 0.5 * deltas[0], deltas[2] - 0.5 * deltas[1] + 0.25 * deltas[0]]
    for got, want in zip(outputs, expected):
        assert torch.allclose(got, want, atol=1e-12)
    apg.begin(None)  # a new generation starts from an empty buffer
    assert torch.allclose(apg.guide(cond, cond - deltas[2]) - cond, deltas[2], atol=1e-12)


def test_parity_with_diffusers_normalized_guidance() -> None:
    """Documented mapping: our scale w, L2 norm, model-output space == diffusers' original formulation
    with guidance_scale = w - 1 (momentum buffer and norm threshold alike)."""
    w, eta, r, beta = 9.0, 0.3, 12.0, -0.5
    ours = ApgGuidance(scale=w, eta=eta, norm_threshold=r, momentum=beta, space="model_output", norm="l2")
    ours.begin(None)
    buffer = MomentumBuffer(beta)
    step = step_context()
    for seed in range(4):
        preds = predictions(seed=seed)
        theirs = normalized_guidance(preds["cond"], preds["uncond"], w - 1.0, buffer, eta=eta, norm_threshold=r,
                                     use_original_formulation=True)
        assert torch.allclose(ours.combine(preds, step), theirs, atol=1e-6), seed


def test_parity_with_diffusers_adaptive_projected_guidance_over_two_generations() -> None:
    """diffusers' guider class, driven as its pipelines drive it (set_state, prepare_inputs, forward), over
    two 4-step generations: its momentum buffer restarts at step 0 and ours at begin()."""
    from diffusers.guiders import AdaptiveProjectedGuidance

    w, eta, r, beta, steps = 9.0, 0.3, 12.0, -0.5, 4
    theirs = AdaptiveProjectedGuidance(guidance_scale=w - 1.0, adaptive_projected_guidance_momentum=beta,
                                       adaptive_projected_guidance_rescale=r, eta=eta, use_original_formulation=True)
    step = step_context()
    for generation in range(2):
        ours = ApgGuidance(scale=w, eta=eta, norm_threshold=r, momentum=beta, space="model_output", norm="l2")
        ours.begin(None)
        for i in range(steps):
            preds = predictions(seed=10 * generation + i)
            theirs.set_state(step=i, num_inference_steps=steps, timestep=torch.tensor(999 - 250 * i))
            theirs.prepare_inputs({})
            expected = theirs.forward(preds["cond"], preds["uncond"]).pred
            assert torch.allclose(ours.combine(preds, step), expected, atol=1e-6), (generation, i)


def test_x0_space_differs_from_model_output_space() -> None:
    step, preds = step_context(), predictions()
    outputs = []
    for space in ("x0", "model_output"):
        apg = ApgGuidance(scale=5.0, eta=0.0, norm_threshold=0.0, momentum=0.0, space=space)
        apg.begin(None)
        outputs.append(apg.combine(preds, step))
    assert (outputs[0] - outputs[1]).abs().max() > 1e-2


def test_rms_threshold_means_the_same_at_every_resolution() -> None:
    """The same per-element update, tiled to a 4x larger latent: RMS clamps it identically, L2 does not."""
    small = predictions()
    large = {k: v.repeat(1, 1, 2, 2) for k, v in small.items()}
    for norm, same in (("rms", True), ("l2", False)):
        apg = ApgGuidance(scale=3.0, eta=1.0, norm_threshold=0.05 if norm == "rms" else 3.0, momentum=0.0, norm=norm)
        a = apg.guide(small["cond"], small["uncond"])
        b = apg.guide(large["cond"], large["uncond"])
        assert torch.allclose(a.repeat(1, 1, 2, 2), b, atol=1e-6) == same, norm


def test_apg_through_the_engine_costs_cfgs_nfe_and_is_cfg_at_eta_one(tiny_sd) -> None:
    """Two evaluations per step, txt2img and img2img; with eta 1, no threshold and no momentum the
    engine's images are CFG's (x0 space: the conversions cancel to float rounding)."""
    import numpy as np
    from PIL import Image

    from accel_diffusion.engine import generate
    from accel_diffusion.strategy import GenerationRequest

    def run(guidance: dict, **fields: object) -> object:
        return generate(tiny_sd, GenerationRequest.create(model="tiny-sd", prompt="a red circle", seed=5, steps=6,
                                                          strategy={"guidance": guidance}, **fields))

    apg = {"name": "apg", "scale": 4.0}
    assert run(apg).nfe == 12
    init = Image.new("RGB", (32, 32), (30, 200, 40))
    assert run(apg, init_image=init, strength=0.5).nfe == 6
    plain = run({"name": "apg", "scale": 4.0, "eta": 1.0, "norm_threshold": 0.0, "momentum": 0.0})
    cfg = run({"name": "cfg", "scale": 4.0})
    assert np.abs(plain.images.astype(np.float64) - cfg.images).max() < 1e-4
